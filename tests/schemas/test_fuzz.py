"""Property: any mutation of an example spec loads, or fails with a SpecError. Nothing else.

Mutations are made on the parsed document at random paths: a value replaced by one of
another type (huge, negative, non-finite, strings, lists, mappings...), a key deleted, an
unknown key inserted, a value wrapped in a list. The default run is bounded (about 300
examples); ``RUN_SLOW=1`` adds a run of a few thousand.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reelfarm.errors import SpecError
from reelfarm.schemas import load_spec

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SPECS = ["tiny/film.yaml", "lonely_flame/film.yaml", "the_herd/film.yaml", "campaign/ad.yaml",
         "campaign/campaign.yaml"]

# Values of every type a YAML or JSON document can hold, weighted towards the awkward.
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([0, -1, 1, 2**31, 2**63, -(2**63), 10**30, 10**300]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.5, 3.5, 1e12, 1e308, -1e308]),
    st.text(max_size=12),
    st.sampled_from(["", "..", "../x.png", "/etc/passwd", "http://127.0.0.1:9/x.png", "s3://b/x",
                     "memory://x", "{product", "{product:>999999999}", "{0}", "{x.y}", "24000/1001",
                     "a::b", "\x00", "x" * 300, "2001-13-45", "diffusers", "wan", "cut"]),
)
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)), max_leaves=6)


def paths(doc: Any, here: tuple = ()) -> list[tuple]:
    """Every path in the document, the root excluded."""
    out = []
    if isinstance(doc, dict):
        for k, v in doc.items():
            out.append((*here, k))
            out.extend(paths(v, (*here, k)))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out.append((*here, i))
            out.extend(paths(v, (*here, i)))
    return out


def parent_of(doc: Any, path: tuple) -> Any:
    for part in path[:-1]:
        doc = doc[part]
    return doc


@st.composite
def mutated(draw: st.DrawFn) -> tuple[str, str]:
    """(example spec, mutated document text)."""
    name = draw(st.sampled_from(SPECS))
    doc = yaml.safe_load((EXAMPLES / name).read_text())
    for _ in range(draw(st.integers(1, 3))):
        where = paths(doc)
        path = draw(st.sampled_from(where))
        parent, last = parent_of(doc, path), path[-1]
        kind = draw(st.sampled_from(["replace", "replace", "delete", "insert", "wrap", "number", "string"]))
        if kind == "replace":
            parent[last] = draw(VALUES)
        elif kind == "delete":
            del parent[last]
        elif kind == "insert":
            target = parent[last] if isinstance(parent[last], dict) else parent
            if isinstance(target, dict):
                target[draw(st.text(min_size=1, max_size=8))] = draw(VALUES)
            else:
                target.insert(0, draw(VALUES))
        elif kind == "wrap":
            parent[last] = [parent[last]]
        elif kind == "number":
            parent[last] = draw(st.sampled_from([10**12, -(10**12), 10**100, -1, 0, 1e308, 2**64]))
        else:
            parent[last] = draw(st.sampled_from(["", "x", "1e400", "-1", "nan", "∞", "s01_010"]))
        if not paths(doc):
            break
    as_json = draw(st.booleans())
    return name, json.dumps(doc) if as_json else yaml.safe_dump(doc, allow_unicode=True)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A copy of examples/ (specs beside their references)."""
    dest = tmp_path_factory.mktemp("fuzz") / "examples"
    shutil.copytree(EXAMPLES, dest, ignore=shutil.ignore_patterns("*.py"))
    return dest


def load_mutated(workdir: Path, name: str, text: str) -> None:
    spec = workdir / name
    folder = spec.parent
    original = (EXAMPLES / name).read_text()
    # Write the mutant where the original lives (a campaign's base film is `ad.yaml`).
    target = spec if name.endswith("ad.yaml") else folder / ("fuzz.json" if text.startswith("{") else "fuzz.yaml")
    if text.startswith("{") and target == spec:
        target = folder / "fuzz.json"
    target.write_text(text, encoding="utf-8")
    try:
        if name.endswith("ad.yaml"):
            load_spec(folder / "campaign.yaml")
        else:
            load_spec(target)
    except SpecError as e:
        assert e.issues, "a SpecError names at least one issue"
        for issue in e.issues:
            assert issue.file and issue.message, issue
    finally:
        spec.write_text(original, encoding="utf-8")


FUZZ = settings(max_examples=300, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@FUZZ
@given(case=mutated())
def test_mutated_examples_load_or_raise_spec_error(workdir, case):
    load_mutated(workdir, *case)


@pytest.mark.slow
@settings(FUZZ, max_examples=4000)
@given(case=mutated())
def test_mutated_examples_load_or_raise_spec_error_long(workdir, case):
    load_mutated(workdir, *case)


@pytest.mark.parametrize("text", [
    "shots: 3.5", "scenes: 3.5", "scenes: [{id: s, shots: 3.5}]", "scenes: [3.5]",
    "characters: [1, 2]", "model: [1]", "fps: .inf", "fps: .nan",
    "scenes: [{id: s, shots: [{id: a, frames: 1, prompt: p, model: 3}]}]",
])
def test_wrong_types_reported_in_issue_10(tmp_path, text):
    path = tmp_path / "film.yaml"
    path.write_text("reelfarm: 1\ntitle: t\n" + text + "\n")
    with pytest.raises(SpecError):
        load_spec(path)


def test_a_float_for_shots_is_a_spec_error(tmp_path):
    # Issue 10: `shots: 3.5` raised TypeError: 'float' object is not iterable in _absolutise.
    path = tmp_path / "film.yaml"
    path.write_text("reelfarm: 1\ntitle: t\nscenes:\n  - id: s01\n    shots: 3.5\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert [str(i) for i in info.value.issues] == [
        f"{path}:5 scenes[0].shots: Input should be a valid tuple, got 3.5"
    ]


def test_a_campaign_placeholder_with_a_format_spec_is_a_spec_error(tmp_path):
    (tmp_path / "film.yaml").write_text("reelfarm: 1\ntitle: '{product:>999999999}'\n"
                                        "scenes: [{id: s, shots: [{id: a, frames: 1, prompt: '{product'}]}]\n")
    (tmp_path / "c.yaml").write_text("reelfarm: 1\ncampaign: c\nfilm: film.yaml\n"
                                     "matrix: {product: {mug: {}}}\n")
    with pytest.raises(SpecError) as info:
        load_spec(tmp_path / "c.yaml")
    assert [i.path for i in info.value.issues] == ["title", "scenes[0].shots[0].prompt"]

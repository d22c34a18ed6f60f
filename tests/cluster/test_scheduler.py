"""The scheduler alone: every rule of its module docstring, driven by events and a fake clock."""

from __future__ import annotations

import ast
import pathlib

import pytest

from reelfarm.cluster import scheduler as sch
from reelfarm.cluster.scheduler import (
    ChunkDone,
    ChunkFailed,
    Fail,
    Job,
    Kill,
    NodeDown,
    NodeUp,
    Requeue,
    Rules,
    Scheduler,
    Spawn,
    Submit,
    Tick,
    WorkerDown,
    WorkerReady,
)
from reelfarm.errors import BackendError, ChunkTimeout, DependencyUnreadable, GpuOutOfMemory, StoreError


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def chain(shot: str, n: int, est: float = 1.0, model: str = "m") -> list[Job]:
    """``n`` chained chunks of one shot: each continues from the one before."""
    jobs = []
    for i in range(n):
        jobs.append(Job(f"{shot}{i}", f"{shot}/chunk-{i}", shot, est, model,
                        depends_on=f"{shot}{i - 1}" if i else None))
    return jobs


def single(key: str, est: float = 1.0, model: str = "m", shot: str | None = None) -> Job:
    return Job(key, f"{key}/chunk", shot or key, est, model)


def submits(decisions) -> list[tuple[str, str]]:
    return [(d.key, d.worker) for d in decisions if isinstance(d, Submit)]


ONE_DEEP = Rules(queue_depth=1)


def start(jobs, workers=("w1",), rules=ONE_DEEP, clock=None, **kw):
    s = Scheduler(jobs, rules, clock=clock or Clock(), **kw)
    out = []
    for i, w in enumerate(workers):
        out += s.on(WorkerReady(w, node=f"n{i + 1}"))
    return s, out


def test_scheduler_imports_neither_ray_nor_the_wall_clock():
    tree = ast.parse(pathlib.Path(sch.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert not imported & {"ray", "time", "datetime", "asyncio"}, imported


def test_rule1_committed_chunks_are_not_rendered():
    s, out = start([single("a"), single("b")], done={"a"})
    assert submits(out) == [("b", "w1")]
    s.on(ChunkDone("w1", "b"))
    assert s.finished and s.rendered == ["b"]


def test_rule2_a_chunk_waits_for_the_one_it_continues_from():
    s, out = start(chain("s", 3), workers=("w1", "w2"))
    assert submits(out) == [("s0", "w1")]  # s1 and s2 wait although w2 is idle
    assert submits(s.on(ChunkDone("w1", "s0"))) == [("s1", "w1")]
    assert submits(s.on(ChunkDone("w1", "s1"))) == [("s2", "w1")]


def test_rule2_a_committed_dependency_makes_its_dependant_ready():
    s, out = start(chain("s", 2), done={"s0"})
    assert submits(out) == [("s1", "w1")]


def test_rule3_longest_chain_first():
    jobs = [single("short", est=5.0), *chain("long", 3, est=2.0)]  # chain of 6 beats 5
    s, out = start(jobs)
    assert submits(out) == [("long0", "w1")]


def test_rule3_a_worker_takes_its_own_model_first():
    jobs = [single("big", est=10.0, model="wan"), single("small", est=1.0, model="ltx")]
    s = Scheduler(jobs, Rules(queue_depth=1), clock=Clock())
    out = s.on(WorkerReady("w1", node="n1", holds="ltx"))
    assert submits(out) == [("small", "w1")]  # no model switch although "big" is longer
    assert next(d for d in out if isinstance(d, Submit)).loads is False
    out = s.on(ChunkDone("w1", "small"))
    assert submits(out) == [("big", "w1")]
    assert next(d for d in out if isinstance(d, Submit)).loads is True  # must load wan


def test_rule4_queue_depth_per_worker():
    jobs = [single(f"c{i}") for i in range(5)]
    s, out = start(jobs, workers=("w1", "w2"), rules=Rules(queue_depth=2))
    sent = submits(out)
    assert len(sent) == 4 and [w for _, w in sent].count("w1") == 2
    head = sent[0][0]
    assert submits(s.on(ChunkDone("w1", head))) == [("c4", "w1")]  # refilled to depth


def test_rule5_lost_worker_retries_elsewhere_and_counts_one_attempt():
    s, out = start([single("a"), single("b")], workers=("w1", "w2"), rules=Rules(queue_depth=2))
    assert submits(out) == [("a", "w1"), ("b", "w1")]
    out = s.on(WorkerDown("w1", "RayActorError"))
    sent = [d for d in out if isinstance(d, Submit)]
    assert {(d.key, d.worker) for d in sent} == {("a", "w2"), ("b", "w2")}
    attempts = {d.key: d.attempt for d in sent}
    assert attempts == {"a": 2, "b": 1}  # only the running chunk counts as an attempt
    assert any(isinstance(d, Requeue) and d.key == "a" for d in out)


def test_rule5_out_of_memory_retries_with_low_memory():
    s, out = start([single("a")], workers=("w1", "w2"))
    out = s.on(ChunkFailed("w1", "a", GpuOutOfMemory("oom")))
    d = next(d for d in out if isinstance(d, Submit))
    assert (d.key, d.worker, d.low_memory, d.attempt) == ("a", "w2", True, 2)  # avoids w1


def test_rule5_bad_input_fails_at_once_and_fails_its_dependants_only():
    jobs = [*chain("s", 3), single("other")]
    s, out = start(jobs, workers=("w1", "w2"))
    assert sorted(submits(out)) == [("other", "w2"), ("s0", "w1")]
    out = s.on(ChunkFailed("w1", "s0", BackendError("bad model")))
    fails = [d.key for d in out if isinstance(d, Fail)]
    assert fails == ["s0", "s1", "s2"]
    assert s.failed_shots == {"s": "s/chunk-0: BackendError: bad model"}
    assert "blocked" in s.failed["s1"]
    s.on(ChunkDone("w2", "other"))
    assert s.finished and s.rendered == ["other"]


def test_rule5_retries_stop_at_max_attempts():
    s, out = start([single("a")], workers=("w1",), rules=Rules(queue_depth=1, max_attempts=2))
    out = s.on(ChunkFailed("w1", "a", StoreError("flaky")))
    assert submits(out) == [("a", "w1")]  # the only worker: avoiding it would stall
    out = s.on(ChunkFailed("w1", "a", StoreError("flaky")))
    assert [d.key for d in out if isinstance(d, Fail)] == ["a"]
    assert s.failed["a"].startswith("StoreError after 2 attempts")
    assert s.finished


def test_rule5_timeout_kills_the_worker_and_retries():
    clock = Clock()
    rules = Rules(queue_depth=1, timeout_factor=10.0, timeout_floor_s=5.0, load_timeout_s=100.0)
    s, out = start([single("a", est=1.0)], workers=("w1", "w2"), rules=rules, clock=clock)
    assert next(d for d in out if isinstance(d, Submit)).loads  # first chunk loads the model
    clock.t = 105.0
    assert s.on(Tick()) == []  # 10 s limit + 100 s for the load: not yet
    clock.t = 110.5
    out = s.on(Tick())
    assert [type(d) for d in out][:1] == [Kill] and out[0].worker == "w1"
    assert ("a", "w2") in submits(out)
    assert "ChunkTimeout" in next(d.error for d in out if isinstance(d, Requeue))


def test_dependency_unreadable_renders_it_again_then_the_chunk():
    s, out = start(chain("s", 2), done={"s0"})
    assert submits(out) == [("s1", "w1")]
    out = s.on(ChunkFailed("w1", "s1", DependencyUnreadable("gone", "s0")))
    assert submits(out) == [("s0", "w1")]
    assert submits(s.on(ChunkDone("w1", "s0"))) == [("s1", "w1")]
    assert s.rerendered == {"s0"}
    s.on(ChunkDone("w1", "s1"))
    assert s.finished and s.rendered == ["s0", "s1"] and not s.failed


def test_dependency_unreadable_twice_fails_the_chunk():
    s, _ = start(chain("s", 2), done={"s0"})
    s.on(ChunkFailed("w1", "s1", DependencyUnreadable("gone", "s0")))
    s.on(ChunkDone("w1", "s0"))
    out = s.on(ChunkFailed("w1", "s1", DependencyUnreadable("gone again", "s0")))
    assert [d.key for d in out if isinstance(d, Fail)] == ["s1"]


def test_rule6_blocklist_after_node_failures_never_the_last_node():
    jobs = [single(f"c{i}") for i in range(6)]
    s = Scheduler(jobs, Rules(queue_depth=1, node_failure_limit=2), clock=Clock())
    out = s.on(NodeUp("n1", slots=1)) + s.on(NodeUp("n2", slots=1))
    assert [type(d) for d in out] == [Spawn, Spawn]
    s.on(WorkerReady("a1", "n1"))
    s.on(WorkerReady("b1", "n2"))
    out = s.on(WorkerDown("a1"))
    assert Spawn("n1") in out  # replaced on its node
    s.on(WorkerReady("a2", "n1"))
    out = s.on(WorkerDown("a2"))
    assert "n1" in s.blocklist and Spawn("n1") not in out
    # n2 is now the last node: its failures never blocklist it.
    for i in range(3):
        out = s.on(WorkerDown(s.alive()[0]))
        assert Spawn("n2") in out and not any(isinstance(d, Kill) for d in out)
        s.on(WorkerReady(f"b{i + 2}", "n2"))
    assert s.blocklist == {"n1"}


def test_blocklisting_kills_the_nodes_other_workers_without_counting_attempts():
    jobs = [single(f"c{i}") for i in range(4)]
    s = Scheduler(jobs, Rules(queue_depth=1, node_failure_limit=1), clock=Clock())
    s.on(WorkerReady("a1", "n1"))
    s.on(WorkerReady("a2", "n1"))
    s.on(WorkerReady("b1", "n2"))
    running = s.running()
    out = s.on(WorkerDown("a1"))
    assert [d.worker for d in out if isinstance(d, Kill)] == ["a2"] and s.blocklist == {"n1"}
    attempts: dict[str, int] = {}
    while not s.finished:
        wid, key = next(iter(s.running().items()))
        assert wid == "b1"
        for d in s.on(ChunkDone(wid, key)):
            if isinstance(d, Submit):
                attempts[d.key] = d.attempt
    assert attempts[running["a1"]] == 2  # the lost worker's chunk: one failed attempt
    assert attempts[running["a2"]] == 1  # the blocklisted node's other chunk: not its fault
    assert sorted(s.rendered) == [f"c{i}" for i in range(4)]


def test_node_down_loses_its_workers_and_no_worker_left_fails_the_rest():
    s = Scheduler([single("a"), single("b")], Rules(queue_depth=1), clock=Clock())
    s.on(NodeUp("n1", slots=1))
    s.on(WorkerReady("w1", "n1"))
    out = s.on(NodeDown("n1"))
    assert sorted(d.key for d in out if isinstance(d, Fail)) == ["a", "b"]
    assert s.finished and all("no worker left" in e for e in s.failed.values())


def test_results_from_a_worker_already_taken_out_are_ignored():
    s, _ = start([single("a")], workers=("w1", "w2"))
    s.on(WorkerDown("w1"))
    assert s.on(ChunkDone("w1", "a")) == []
    assert s.running() == {"w2": "a"}


@pytest.mark.parametrize("n", [2000])
def test_many_chunks_many_workers_is_fast(n):
    jobs = [single(f"c{i}", est=float(i % 7 + 1)) for i in range(n)]
    s = Scheduler(jobs, Rules(queue_depth=2), clock=Clock())
    for i in range(64):
        s.on(WorkerReady(f"w{i}", f"n{i // 8}"))
    while not s.finished:
        for wid, key in list(s.running().items()):
            s.on(ChunkDone(wid, key))
    assert sorted(s.rendered) == sorted(j.key for j in jobs)


def test_rules_from_settings():
    from reelfarm.settings import Settings

    r = Rules.from_settings(Settings(max_attempts=5, queue_depth=3))
    assert (r.max_attempts, r.queue_depth) == (5, 3)


def test_chain_estimates():
    jobs = [*chain("s", 3, est=2.0), single("x", est=1.0)]
    assert sch.chain_estimates(jobs) == {"s0": 6.0, "s1": 4.0, "s2": 2.0, "x": 1.0}


def test_timeout_is_a_retryable_class():
    assert ChunkTimeout.retryable


def test_rule7_a_chunk_another_run_holds_is_parked_then_done_without_rendering():
    from reelfarm.cluster.scheduler import ChunkCommitted, ChunkHeld

    s, out = start([*chain("s", 2), single("x")], workers=("w1",))
    assert submits(out) == [("s0", "w1")]
    out = s.on(ChunkHeld("w1", "s0"))  # another run holds s0's lease
    assert submits(out) == [("x", "w1")] and "s0" in s.held and not s.finished
    s.on(ChunkDone("w1", "x"))
    assert not s.finished and s.running() == {}  # s1 waits on the parked s0
    out = s.on(ChunkCommitted("s0"))  # the other run committed it
    assert submits(out) == [("s1", "w1")] and s.elsewhere == ["s0"]
    s.on(ChunkDone("w1", "s1"))
    assert s.finished and sorted(s.rendered) == ["s1", "x"] and not s.failed


def test_rule7_a_released_lease_makes_the_chunk_ready_again_with_its_attempts_untouched():
    from reelfarm.cluster.scheduler import ChunkHeld, ChunkReleased

    s, out = start([single("a")], workers=("w1",))
    s.on(ChunkHeld("w1", "a"))
    assert s.running() == {} and not s.finished
    out = s.on(ChunkReleased("a"))  # the holder's lease lapsed uncommitted
    sent = [d for d in out if isinstance(d, Submit)]
    assert [(d.key, d.attempt) for d in sent] == [("a", 1)]


def test_rule7_our_own_commit_found_on_retry_counts_as_rendered_once():
    from reelfarm.cluster.scheduler import ChunkCommitted, ChunkHeld

    s, _ = start([single("a")], workers=("w1", "w2"))
    s.on(WorkerDown("w1", "node lost after the chunk was committed"))
    s.on(ChunkHeld("w2", "a"))  # the retry finds the lost worker's commit
    s.on(ChunkCommitted("a", ours=True))
    assert s.finished and s.rendered == ["a"] and s.elsewhere == []


def test_rule8_a_draining_node_gets_no_new_chunk_nor_worker_and_its_loss_is_not_its_fault():
    from reelfarm.cluster.scheduler import NodeDraining

    jobs = [single(f"c{i}") for i in range(6)]
    s = Scheduler(jobs, Rules(queue_depth=1, node_failure_limit=1), clock=Clock())
    s.on(NodeUp("n1", slots=1))
    s.on(NodeUp("n2", slots=1))
    s.on(WorkerReady("a", "n1"))
    s.on(WorkerReady("b", "n2"))
    running = s.running()
    assert s.on(NodeDraining("n1")) == []
    out = s.on(ChunkDone("a", running["a"]))  # the running chunk finishes...
    assert submits(out) == []  # ...and nothing new goes to the draining node
    out = s.on(WorkerDown("a", "preempted"))
    assert Spawn("n1") not in out and "n1" not in s.blocklist  # not replaced, not blamed
    while not s.finished:
        wid, key = next(iter(s.running().items()))
        assert wid == "b"
        s.on(ChunkDone(wid, key))
    assert sorted(s.rendered) == sorted(j.key for j in jobs)



def test_a_worker_leaves_its_model_for_a_chain_over_twice_as_long_once_every_class_has_started():
    # Rule 3's exception, also on the quick path taken once every cost class has been probed.
    jobs = [single(f"x{i}", model="a") for i in range(4)] + chain("p", 6, model="b") + chain("q", 6, model="b")
    s, _ = start(jobs, workers=())
    first = submits(s.on(WorkerReady("w1", "n1", holds="a")) + s.on(WorkerReady("w2", "n1", holds="b")))
    assert len(first) == 2 and {k[0] for k, _ in first} == {"p", "x"} and not s._unstarted
    single_key, worker = next((k, w) for k, w in first if k.startswith("x"))
    # That worker now holds "a", and "a" singles are ready; a "b" chain of 6 is over twice as long.
    assert submits(s.on(ChunkDone(worker, single_key, seconds=1.0))) == [("q0", worker)]

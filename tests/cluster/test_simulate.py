"""The simulator against closed forms, and the scheduler's learned costs through it."""

from __future__ import annotations

import math

import pytest

from reelfarm.cluster.scheduler import ChunkDone, Job, Rules, Scheduler, Submit, WorkerReady
from reelfarm.cluster.simulate import FAMILY_COSTS, GPU_CLASSES, SimSpec, chunk_seconds, simulate


def independent(n: int, cost: float, est: float | None = None) -> tuple[list[Job], dict]:
    jobs = [Job(f"c{i}", f"s{i}/chunk-0", f"s{i}", est or cost, "m") for i in range(n)]
    return jobs, {j.key: (cost, 10) for j in jobs}


def one_chain(costs_s: list[float]) -> tuple[list[Job], dict]:
    jobs = [Job(f"c{i}", f"s/chunk-{i}", "s", 1.0, "m", depends_on=f"c{i - 1}" if i else None)
            for i in range(len(costs_s))]
    return jobs, {j.key: (c, 10) for j, c in zip(jobs, costs_s)}


@pytest.mark.parametrize("n,gpus,cost", [(1, 1, 3.0), (103, 10, 7.0), (64, 8, 2.5), (5, 16, 1.0)])
def test_independent_equal_chunks_take_ceil_n_over_gpus_times_cost(n, gpus, cost):
    jobs, costs = independent(n, cost)
    r = simulate(jobs, costs, SimSpec(gpus=gpus, gpus_per_node=4, load_s=0))
    assert r.makespan == pytest.approx(math.ceil(n / gpus) * cost)
    assert r.bound == pytest.approx(max(n * cost / gpus, cost))
    assert r.failed == 0 and r.chunks == n


def test_one_chain_takes_the_sum_of_its_costs_whatever_the_gpus():
    costs_s = [1.0 + (i % 3) for i in range(40)]
    jobs, costs = one_chain(costs_s)
    r = simulate(jobs, costs, SimSpec(gpus=16, load_s=0))
    assert r.makespan == pytest.approx(sum(costs_s)) == pytest.approx(r.critical_path_s)
    assert r.critical_path_chunks == 40 and r.ratio == pytest.approx(1.0)


def test_cost_and_utilisation_count_gpu_hours_held():
    jobs, costs = independent(16, 3600.0)
    r = simulate(jobs, costs, SimSpec(gpus=8, gpu="a100", load_s=0))
    assert r.makespan == 7200.0 and r.gpu_hours_held == pytest.approx(16.0)
    assert r.usd == pytest.approx(16 * GPU_CLASSES["a100"].usd_per_hour)
    assert r.utilisation == pytest.approx(1.0)


def test_model_loads_are_paid_once_per_worker():
    jobs, costs = independent(8, 10.0)
    r = simulate(jobs, costs, SimSpec(gpus=2, load_s=5.0))
    assert r.makespan == pytest.approx(5.0 + 4 * 10.0) and r.load_s == pytest.approx(10.0)


def test_preemptions_cost_the_work_since_the_last_checkpoint_and_are_seeded():
    jobs, costs = independent(400, 600.0)
    spec = SimSpec(gpus=16, preempt_per_gpu_hour=0.5, checkpoint_steps=5, replace_s=60, load_s=0, seed=3,
                   rules=Rules(max_attempts=20))
    a, b = simulate(jobs, costs, spec), simulate(jobs, costs, spec)
    assert a.preemptions > 0 and a.makespan == b.makespan and a.lost_s == b.lost_s
    # a save every 5 of 10 steps: at most 300 s lost per running chunk hit
    assert 0 < a.lost_s <= a.preemptions * 8 * 300.0 and a.failed == 0
    never = simulate(jobs, costs, SimSpec(**{**spec.__dict__, "checkpoint_steps": 0}))
    assert never.lost_s > a.lost_s and never.makespan >= a.makespan


def test_table_seeds_the_measured_h200_figures():
    ltx = chunk_seconds("ltx", "h200", 768, 512, 121, 40)
    assert ltx == pytest.approx(0.14 * 40 + 1.4)
    assert chunk_seconds("svd", "h200", 1024, 576, 25, 25) == pytest.approx(3.04 * 25 + 2.9)
    assert chunk_seconds("ltx", "l4", 768, 512, 121, 40) == pytest.approx(ltx / GPU_CLASSES["l4"].throughput)
    assert FAMILY_COSTS["ltx"].measured and not FAMILY_COSTS["wan"].measured


def test_the_scheduler_learns_a_class_cost_and_reorders_the_chains():
    # "slow" chains are estimated 3x short: by estimate the "fast" singles go first...
    jobs = [Job(f"f{i}", f"f{i}/chunk-0", f"f{i}", 5.0, "m", cost="fast", frames=10) for i in range(4)]
    jobs += [Job(f"s{i}", f"s/chunk-{i}", "s", 1.0, "m", f"s{i - 1}" if i else None, cost="slow", frames=10)
             for i in range(3)]
    s = Scheduler(jobs, Rules(queue_depth=1), clock=lambda: 0.0)
    out = s.on(WorkerReady("w1", "n1", holds="m")) + s.on(WorkerReady("w2", "n1", holds="m"))
    sent = [(d.key, d.worker) for d in out if isinstance(d, Submit)]
    assert sent == [("f0", "w1"), ("s0", "w2")]  # w2 probes the unmeasured class
    s.on(ChunkDone("w1", "f0", seconds=5.0))  # as estimated
    out = s.on(ChunkDone("w2", "s0", seconds=9.0))  # 3x the estimate: the chain is 18 s more
    assert [d.key for d in out if isinstance(d, Submit)] == ["s1"] and s.rechains == 1
    assert s.estimate(jobs[-1]) == pytest.approx(9.0)


def test_learning_holds_the_critical_path_under_a_3x_wrong_estimate():
    # 30 one-chunk shots estimated 3x long, and a chain of 6 estimated 3x short.
    jobs = [Job(f"f{i}", f"f{i}/chunk-0", f"f{i}", 30.0, "m", cost="fast", frames=1) for i in range(30)]
    jobs += [Job(f"s{i}", f"s/chunk-{i}", "s", 10.0 / 3, "m", f"s{i - 1}" if i else None, cost="slow",
                 frames=1) for i in range(6)]
    costs = {j.key: (10.0, 10) for j in jobs}
    # One chunk per worker at a time: a queued chunk would delay the chain either way.
    spec = SimSpec(gpus=8, load_s=0, rules=Rules(queue_depth=1))
    on = simulate(jobs, costs, spec)
    off = simulate(jobs, costs, SimSpec(**{**spec.__dict__, "learn": False}))
    assert on.makespan == on.bound == 60.0
    assert off.makespan == 90.0  # the chain waits behind the singles


def test_a_per_chunk_overhead_holds_the_worker_but_is_not_part_of_the_bound():
    jobs, costs = independent(20, 3.0)
    r = simulate(jobs, costs, SimSpec(gpus=8, load_s=0, chunk_overhead_s=0.5))
    assert r.makespan == pytest.approx(3 * 3.5) and r.bound == pytest.approx(20 * 3.0 / 8)


def test_the_simulator_runs_the_farm_default_rules():
    from reelfarm.cluster.scheduler import Rules
    from reelfarm.settings import Settings

    assert SimSpec(gpus=1).rules == Rules.from_settings(Settings.model_construct())

"""The lm-eval integration, offline: the registered model, both request types, identity, and a lossy policy."""

import os

import pytest

import baselines  # noqa: F401
from evals.harness import EvalRun, evaluate, rows, task_manager
from evals.lm_eval_model import TideLM
from tide.engine import load

TASKS = ["tide_arith", "tide_arith_mc"]


def run(tiny_dir, policy, budget=None, **options):
    return EvalRun(policy, TideLM(policy=policy, mc_samples=2, gen_length=8,
                                  engine=load(tiny_dir, policy=policy, gpu_budget=budget, **options)), budget)


def test_registered_name():
    from lm_eval.api.registry import get_model

    assert get_model("tide") is TideLM


def test_policies_match_reference_and_a_lossy_one_is_caught(tiny_dir):
    runs = [run(tiny_dir, "reference"), run(tiny_dir, "lru", "4/layer"),
            run(tiny_dir, "tide", "4/layer", refresh_interval=2)]
    lossy = run(tiny_dir, "cpu-fallback", "4/layer")
    lossy.label = "dropper"
    store = lossy.lm.engine.store
    for layer in store.layers:  # drop the most popular expert of every layer (resident copy and host master)
        e = sorted(lossy.lm.engine.executor.policy.static[layer])[0]
        store.gpu[layer][store.slot_of[layer][e]].zero_()
        store.host[layer][e].zero_()
    evaluate(runs + [lossy], TASKS, limit=3)
    table = rows(runs + [lossy])
    assert {r["task"] for r in table} == set(TASKS)
    assert {r["metric"] for r in table} == {"exact_match", "acc"}
    kinds = {x["kind"] for x in runs[0].lm.records}
    assert kinds == {"generate", "loglikelihood"}  # both request types went through our model
    for r in table:
        if r["policy"] != "dropper":
            assert r["lossless"] and r["identical_fraction"] == 1.0, r
    assert any(not r["lossless"] for r in table if r["policy"] == "dropper")


def test_monte_carlo_likelihood_is_deterministic(tiny_dir):
    lm = TideLM(mc_samples=4, engine=load(tiny_dir), seed=3)
    ctx, cont = lm.engine.encode("12+35="), lm.engine.encode("47")
    a, b = lm.score(ctx, cont), lm.score(ctx, cont)
    assert a == b and a[0] < 0
    with pytest.raises(ValueError, match="non-empty"):
        lm.score([], cont)


def test_task_yamls_load_from_another_directory(tmp_path):
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        manager = task_manager()
        assert {"tide_arith", "tide_arith_mc", "tide_humaneval"} <= set(manager.all_tasks)
        from lm_eval.tasks import get_task_dict

        tasks = get_task_dict(["tide_arith_mc", "tide_humaneval"], manager)
        docs = list(tasks["tide_humaneval"].test_docs())
        assert len(docs) == 164 and "def " in docs[0]["prompt"]
        mc = list(tasks["tide_arith_mc"].test_docs())
        assert len(mc) == 200
        for d in mc:  # the right answer at the label; distractors distinct and as wide as it ("042")
            assert int(d["choices"][d["label"]]) == sum(int(x) for x in d["prompt"][:-1].split("+"))
            assert len(set(d["choices"])) == len(d["choices"]) and len({len(c) for c in d["choices"]}) == 1
    finally:
        os.chdir(cwd)


def test_humaneval_scorer_runs_code():
    from evals.tasks.utils import humaneval_pass, load_humaneval

    doc = load_humaneval()["test"][0]
    assert humaneval_pass(doc, [doc["canonical_solution"]]) == {"pass@1": 1.0}
    assert humaneval_pass(doc, ["    return None\n"]) == {"pass@1": 0.0}

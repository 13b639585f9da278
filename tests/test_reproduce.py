"""`tide reproduce`: the paper's settings chosen from the config, the report, and a run on the built-in model."""

import pytest
from click.testing import CliRunner

from tide.cli import main
from tide.config import preset
from tide.evals.reproduce import PAPER_DECODE, paper_model, report, reproduce_spec


def test_paper_settings_follow_the_config():
    mini, flash, tiny = preset("mini"), preset("flash"), preset("tiny")
    assert paper_model(mini) == "mini" and paper_model(flash) == "flash" and paper_model(tiny) is None
    spec = reproduce_spec("m", mini, True, False, {})
    assert spec.budgets == ["128/layer", "64/layer"] and spec.tasks == ["tide_mbpp_sanitized"]
    assert spec.decode == PAPER_DECODE and spec.apply_chat_template and spec.regimes == ["block-kv", "full"]
    assert reproduce_spec("m", flash, True, False, {}).budgets == ["64/layer", "32/layer"]
    assert reproduce_spec("m", mini, False, False, {"gen_length": 16}, limit=3).decode["gen_length"] == 16


def test_report_puts_the_papers_figures_beside_ours_labelled_second_hand():
    rows = [{"task": "tide_mbpp_sanitized", "metric": "pass@1", "value": v, "stderr": 0.01, "policy": p,
             "budget": "128/layer", "regime": "block-kv", "tokens_per_s": t, "tokens_per_s_per_sample": t,
             "identical_fraction": 1.0, "mb_h2d": 1.0,
             "gpu_hit_ratio": 0.9, "forwards": 10, "lossless": True, "is_comparison": False, "lossless_level": "a",
             "identical_to_tier_matched": None, "token_agreement": 1.0}
            for p, v, t in (("lru", 0.5, 1.0), ("tide", 0.5, 1.5))]
    header = {"model": "m", "command": "c", "machine": "x", "commit": "y", "against": "full-offload",
              "against_why": "w", "notes": [], "spec": {"tasks": ["tide_mbpp_sanitized"], "limit": None, "decode": {},
                                                        "apply_chat_template": True, "budgets": ["128/layer"],
                                                        "regimes": ["block-kv"], "refresh_interval": "auto"}}
    text = report(rows, header, "mini")
    assert "second-hand" in text and "2.44 tok/s" in text and "| 1.50 |" in text  # tide's speed-up over lru


def test_reproduce_on_the_built_in_model_writes_its_report(tmp_path):
    pytest.importorskip("lm_eval", reason="tide reproduce runs lm-eval: it is not installed (pip install .[dev])")
    out = tmp_path / "r"
    res = CliRunner().invoke(main, ["--threads", "1", "reproduce", "--limit", "2", "--policies", "reference,lru,tide",
                                    "--regimes", "block-kv", "--out", str(out)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    text = (out / "reproduce.md").read_text()
    assert "## Table 1 (ours, measured)" in text and "identical to reference" in text
    assert "no figures for this model shape" in text and (out / "eval.csv").is_file()
    requests = __import__("pandas").read_csv(out / "requests.csv")
    assert len(requests) == 5 * 2 and (requests.generated_tokens > 0).all()  # (reference + 2 x 2 budgets) x 2
    assert list((out / "lm_eval").rglob("samples_*.jsonl"))  # per-sample outputs are kept


def test_table1_gives_tides_speed_up_over_the_reference_at_each_budget():
    from tide.evals.reproduce import table1

    def row(policy, budget, tokens_per_s):
        return {"task": "t", "metric": "pass@1", "value": 0.5, "stderr": 0.01, "policy": policy, "budget": budget,
                "regime": "block-kv", "tokens_per_s": tokens_per_s, "tokens_per_s_per_sample": tokens_per_s,
                "identical_fraction": 1.0, "mb_h2d": 1.0, "gpu_hit_ratio": 0.9}

    rows = [row("reference", "all", 4.0), row("lru", "64/layer", 1.0), row("tide", "64/layer", 2.0),
            row("lru", "128/layer", 3.0), row("tide", "128/layer", 3.0)]
    t = table1(rows, "reference", None).set_index(["policy", "budget"])["tide speed-up over it"]
    assert t["reference", "all"] == "0.5 at 64/layer, 0.75 at 128/layer"  # TIDE slower than all-resident
    assert t["lru", "64/layer"] == 2.0 and t["lru", "128/layer"] == 1.0
    assert t["tide", "64/layer"] is None

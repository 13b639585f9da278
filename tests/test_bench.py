"""The benchmark harness on the tiny model: rows, schema, identity, report files, checks, and the oracle bound."""

import json
import sys

import pandas as pd
import pytest

import tide.baselines  # noqa: F401
from tide.bench import report
from tide.bench.bounds import oracle_bound_s
from tide.bench.check import bytes_report, check
from tide.bench.sweep import COLUMNS, SweepSpec, projections, run_sweep, variants
from tide.calibrate import estimate
from tide.config import DecodeConfig
from tide.policy import PolicyContext, make_policy
from tide.trace import replay


@pytest.fixture(scope="module")
def sweep(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    cost = estimate("h100-pcie5", 64, 32, 4)
    spec = SweepSpec(str(tiny_dir), ["reference", "full-offload", "lru", "cpu-fallback", "tide", "tide+interval"],
                     ["25%"], ["block-kv"], ["def f(x):", "abc"] * 8, DecodeConfig(gen_length=16, block_length=8),
                     repeat=1, cost=cost, out=out)
    rows, context = run_sweep(spec)
    return spec, rows, context, cost


def test_rows_schema_and_identity(sweep):
    spec, rows, context, _ = sweep
    bench = pd.read_csv(spec.out / "bench.csv")
    assert list(bench.columns[: len(COLUMNS)]) == COLUMNS
    assert len(bench) == 6 and set(bench.variant) == {"reference", "full-offload", "lru", "cpu-fallback", "tide",
                                                      "tide+interval"}
    assert bench.identical_to_reference.all() and (bench.truth == "reference").all()
    assert (bench.kind == "measured").all() and bench.hw_cpu.notna().all()
    levels = dict(zip(bench.variant, bench.lossless_level, strict=True))
    assert levels["lru"] == levels["full-offload"] == "a" and levels["cpu-fallback"] == levels["tide"] == "b"
    host = bench[bench.lossless_level == "b"]
    assert host.identical_to_tier_matched.astype(bool).all()  # level b, replayed from each run's host sets
    assert (bench.top1_agreement == 1.0).all()
    # level a: one kernel, identity; level b: the host tier may run a compiled kernel (auto: avx2 in fp32), which
    # sums in another order than torch's GEMM: fp32 rounding only
    assert (bench[bench.lossless_level == "a"].logits_max_abs_diff == 0.0).all()
    assert (host.logits_max_abs_diff < 1e-5).all()
    assert (bench.top1_positions == 16 * 16).all()  # every generated position of every prompt, pooled
    assert (bench.token_agreement == 1.0).all() and bench.first_divergence.isna().all()
    tide = bench[bench.variant == "tide"].iloc[0]
    assert tide.bytes_h2d < bench[bench.variant == "lru"].iloc[0].bytes_h2d


def test_report_and_checks(sweep, tmp_path):
    spec, rows, context, cost = sweep
    bench = pd.read_csv(spec.out / "bench.csv")
    proj = pd.DataFrame(projections(rows, context, ["a100-pcie4"]))
    assert set(proj.kind.str.startswith("modelled")) == {True}
    md = report.markdown(bench, proj, ["card line"], "tide bench --test")
    assert "## Measured" in md and "## Modelled projections" in md and "Where a baseline beats TIDE" in md
    assert "| batch_size" not in md.split("## Modelled projections")[1]  # one batch size: no column
    two = pd.concat([proj, proj.assign(batch_size=4)])  # rows of two batch sizes say which is which
    assert "| batch_size" in report.markdown(bench, two, ["card line"], "t").split("## Modelled projections")[1]
    report.plot(bench, tmp_path / "b.png")
    assert (tmp_path / "b.png").stat().st_size > 1000
    assert check(bench, context, cost) == []
    lossy = bench.copy()
    lossy.loc[lossy.variant == "lru", "identical_to_reference"] = False
    assert any("lru at 25% (block-kv, batch 1) (no host tier) is not token-identical" in f
               for f in check(lossy, context, cost))
    slot_bug = bench.copy()
    slot_bug.loc[slot_bug.variant == "tide", "identical_to_tier_matched"] = False
    assert any("tide at 25% (block-kv, batch 1) is not token-identical to its tier-matched" in f
               for f in check(slot_bug, context, cost))
    n = int(bench.top1_positions.iloc[0])
    drift = bench.copy()
    drift.loc[drift.variant == "cpu-fallback", "top1_flips"] = n // 5  # a wrong expert flips many argmaxes
    assert any("cpu-fallback at 25% (block-kv, batch 1) against reference: " in f
               and "teacher-forced argmaxes differ" in f for f in check(drift, context, cost))
    near_ties = bench.copy()
    near_ties.loc[near_ties.variant == "cpu-fallback", "top1_flips"] = 1  # one flipped near-tie: a correct engine
    assert check(near_ties, context, cost) == []
    heavy = bench.copy()  # bytes are reported, not promised: a run that moves more is not a failure
    heavy.loc[heavy.variant == "tide", "bytes_h2d"] = 10**12
    assert check(heavy, context, cost) == [] and any("tide 1000.00 GB" in line for line in bytes_report(heavy))


def test_oracle_bound_is_below_every_policy(sweep):
    _, rows, context, cost = sweep
    engine = context["engine"]
    cost = cost.for_expert_bytes(engine.store.expert_bytes)
    for (variant, budget, regime, _batch), trace in context["traces"].items():
        if variant == "reference":
            continue
        slots = next(r["slots_per_layer"] for r in rows if r["variant"] == variant)
        ctx = PolicyContext(16, (1, 2), slots, context["profiles"][(budget, regime, _batch)][0])
        for policy in ("full-offload", "lru", "cpu-fallback"):
            modelled = replay(trace, make_policy(policy, ctx), slots, cost).step_s
            assert oracle_bound_s(trace, slots, cost) <= modelled + 1e-12


def test_variant_names():
    assert variants(["tide+costfetch"]) == [("tide", "tide+costfetch", {"cost_fetch": True})]
    with pytest.raises(ValueError, match="variant"):
        variants(["lru+interval"])


def test_cli_bench_end_to_end(tiny_dir, tmp_path):
    from click.testing import CliRunner

    from tide.cli import main

    profile = estimate("a100-pcie4", 64, 32, 4).to_json(tmp_path / "p.json")
    out = tmp_path / "run"
    res = CliRunner().invoke(main, ["--threads", "1", "bench", "--model", str(tiny_dir), "--policies",
                                    "reference,lru,tide", "--budgets", "4/layer", "--regime", "full", "--gen-length",
                                    "48", "--block-length", "8", "--repeat", "1", "--profile", str(profile),
                                    "--batch-sizes", "1,2",
                                    "--projections", "h100-pcie5", "--out", str(out), "--check"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output.strip().splitlines()[-1])
    assert summary["failures"] == [] and summary["rows"] == 6
    csv = pd.read_csv(out / "bench.csv")
    assert sorted(csv.batch_size) == [1, 1, 1, 2, 2, 2] and csv.identical_to_reference.all()
    assert csv[csv.variant == "tide"].refresh_interval.notna().all()  # the R it ran with (contract reconfigures)
    for column in ("tokens_per_s_per_request", "mb_h2d_per_token", "host_tokens_per_expert", "requests"):
        assert column in csv, column
    assert (pd.read_csv(out / "bench.csv").top1_positions >= 256).all()  # level c decided on enough positions
    for name in ("bench.csv", "bench.md", "bench.png", "env.json", "projections.csv"):
        assert (out / name).is_file(), name
    again = CliRunner().invoke(main, ["bench", "--model", str(tiny_dir), "--out", str(out)])
    assert again.exit_code == 2 and "never overwritten" in again.output


def test_bound_pieces_by_hand():
    from tide.bench.bounds import compute_balance_s, copy_balance_s

    assert compute_balance_s([1.0, 1.0], [3.0, 3.0]) == pytest.approx(1.5)  # 1.5 on the device, 1.5 on the CPU
    assert compute_balance_s([1.0], [0.5]) == pytest.approx(1 / 3)  # x*1 = (1-x)*0.5
    assert copy_balance_s([5.0, 4.0, 3.0, 1.0], slots=1, fetch_s=2.0) == pytest.approx(4.0)  # copy 4: max(2, 3+1)


def test_prompts_are_jsonl_and_keep_blank_lines(tmp_path):
    from tide.bench.runner import DEFAULT_PROMPTS, read_prompts

    prompts = read_prompts(None)
    assert DEFAULT_PROMPTS.suffix == ".jsonl" and len(prompts) >= 6
    assert any("\n\n" in p for p in prompts)  # code prompts with blank lines stay whole
    assert sum("You are an expert Python programmer" in p for p in prompts) >= 2  # MBPP-style prompts
    bad = tmp_path / "p.jsonl"
    bad.write_text('"ok"\nnot json\n')
    with pytest.raises(ValueError, match="p.jsonl:2: not JSON"):
        read_prompts(str(bad))


def test_a_run_that_runs_out_of_memory_is_a_row_and_the_sweep_goes_on(tiny_dir, tmp_path, monkeypatch):
    from tide.engine import Engine
    from tide.experts.store import DeviceMemoryError

    real = Engine.configure

    def configure(self, policy, *a, **k):
        if policy == "full-offload":
            raise DeviceMemoryError("4 expert slots per layer need 9.00 GB on cuda:0; 1.00 GB is free there")
        return real(self, policy, *a, **k)

    monkeypatch.setattr(Engine, "configure", configure)
    spec = SweepSpec(str(tiny_dir), ["reference", "full-offload", "tide"], ["4/layer"], ["block-kv"], ["abc"],
                     DecodeConfig(gen_length=8, block_length=8), repeat=1, cost=estimate("h100-pcie5", 64, 32, 4),
                     out=tmp_path / "b", tide_options={"refresh_interval": 2})
    rows, context = run_sweep(spec)
    bench = pd.read_csv(spec.out / "bench.csv")
    assert list(bench.kind) == ["measured", "error", "measured"] and "9.00 GB" in bench.error.iloc[1]
    assert any("full-offload at 4/layer (block-kv) failed" in f for f in check(bench, context, spec.cost))
    assert "## Runs that failed" in report.markdown(bench, None, [], "t")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="on a GPU machine gpu-check really runs")
def test_gpu_check_without_cuda_says_so_and_runs_nothing():
    import subprocess

    done = subprocess.run([sys.executable, "-m", "tide.bench.gpu_check"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip().splitlines() == [
        "gpu-check: no CUDA device on this machine; nothing was run."]


def test_soak_holds_on_a_short_run(tiny_dir, tmp_path):
    from click.testing import CliRunner

    from tide.bench.soak import main as soak

    res = CliRunner().invoke(soak, ["--model", str(tiny_dir), "--requests", "12", "--per-config", "2", "--policies",
                                    "lru,tide", "--budgets", "4/layer", "--gen-length", "8", "--out",
                                    str(tmp_path / "s")])
    assert res.exit_code == 0, res.output
    assert "Every check holds." in (tmp_path / "s" / "soak.md").read_text()
    assert len((tmp_path / "s" / "soak.csv").read_text().splitlines()) == 13


def _bench_frame(budgets: list[str], regimes=("block-kv", "full")) -> "pd.DataFrame":
    import pandas as pd

    rows = []
    for regime in regimes:
        for variant, budget in [("reference", "all")] + [(v, b) for v in ("lru", "tide") for b in budgets]:
            for repeat in (0, 1):
                rows.append({"kind": "measured", "variant": variant, "budget": budget, "regime": regime,
                             "slots_per_layer": 8 if budget == "all" else 2 + budgets.index(budget),
                             "tokens_per_s": 3.9 + 0.1 * repeat + (regime == "full"), "forwards_per_block": 8,
                             "bytes_h2d": 14400.0, "gpu_hit_ratio": 0.5, "pairs_cpu": 10, "moe_s": 0.1,
                             "lossless_level": "a", "identical_to_reference": True, "identical_to_tier_matched": None,
                             "top1_agreement": 1.0, "top1_flips": 0, "top1_positions": 32, "refresh_interval": 4,
                             "repeat": repeat})
    return pd.DataFrame(rows)


def _plotted_axes(bench, path, proj=None) -> list:
    """report.plot's figure axes, captured as it saves them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tide.bench import report

    shown = {}
    real_savefig = plt.Figure.savefig

    def capture(fig, *args, **kwargs):
        shown["axes"] = fig.axes
        return real_savefig(fig, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plt.Figure, "savefig", capture)
        report.plot(bench, path, proj)
    return shown["axes"]


@pytest.mark.parametrize("budgets", [["25%"], ["25%", "50%"]])
def test_bench_png_shows_every_policy_from_zero_on_one_scale(tmp_path, budgets):
    """Bars per policy at each budget, y from 0, the same y scale in every panel, the reference as a line."""
    axes = _plotted_axes(_bench_frame(budgets), tmp_path / "bench.png")
    assert (tmp_path / "bench.png").stat().st_size > 0
    assert len(axes) == 2 and len({ax.get_ylim() for ax in axes}) == 1
    for ax in axes:
        assert ax.get_ylim()[0] == 0 and ax.get_ylim()[1] > 4.0
        assert len(ax.containers) >= 2  # one bar series per policy other than the reference (plus error bars)
        assert sum(len(c.patches) for c in ax.containers if hasattr(c, "patches")) == 2 * len(budgets)
        assert any(line.get_linestyle() == "--" for line in ax.get_lines())  # the reference


def test_bench_png_puts_modelled_projections_beside_the_measured_time(tmp_path):
    """A second row: per run, measured MoE time per token beside each reference machine's modelled time."""
    bench = _bench_frame(["25%"]).assign(generated_tokens=64)
    proj = pd.DataFrame([{"machine": m, "variant": v, "budget": "25%", "regime": r, "generated_tokens": 64,
                          "expert_s": 0.01 * (1 + i)} for i, m in enumerate(("h100-pcie5", "a100-pcie4"))
                         for v in ("lru", "tide") for r in ("block-kv", "full")])
    axes = _plotted_axes(bench, tmp_path / "bench.png", proj)
    assert len(axes) == 4
    second = axes[2:]
    assert len({ax.get_ylim() for ax in second}) == 1 and second[0].get_ylim()[0] == 0
    for ax in second:
        hatched = [p for c in ax.containers if hasattr(c, "patches") for p in c.patches if p.get_hatch()]
        solid = [p for c in ax.containers if hasattr(c, "patches") for p in c.patches if not p.get_hatch()]
        assert len(hatched) == 2 * 2 and len(solid) == 2  # two machines x two runs; measured for each run
        assert sorted(round(p.get_height(), 6) for p in hatched) == [0.15625, 0.15625, 0.3125, 0.3125]
        assert [round(p.get_height(), 6) for p in solid] == [round(1e3 * 0.1 / 64, 6)] * 2


def test_terminal_table_is_compact_and_formatted_for_people():
    from tide.bench import report

    text = report.compact(_bench_frame(["25%"]))
    assert max(len(line) for line in text.splitlines()) < 120 and "e+" not in text
    assert "0.0144" in text or "0.014" in text  # MB H2D: 14,400 bytes
    assert report.number(14400.0) == "14,400" and report.number(3.14159) == "3.14"


def test_soak_that_decodes_no_prompt_twice_does_not_claim_identity(tiny_dir, tmp_path):
    from click.testing import CliRunner

    from tide.bench.soak import main as soak

    res = CliRunner().invoke(soak, ["--model", str(tiny_dir), "--requests", "3", "--per-config", "1", "--policies",
                                    "lru", "--budgets", "4/layer", "--gen-length", "8", "--out", str(tmp_path / "s")])
    assert res.exit_code == 1 and "no prompt was decoded twice" in res.output
    assert "Every check holds." not in (tmp_path / "s" / "soak.md").read_text()


def test_tables_are_written_without_tabulate(monkeypatch):
    """make gpu-check runs on a bare GPU machine's Python (no tabulate): the same table, pipe-separated."""

    from tide.bench import report

    df = pd.DataFrame({"policy": ["tide"], "tok/s": [14400.0]})
    monkeypatch.setitem(sys.modules, "tabulate", None)  # import tabulate -> ImportError
    assert report.table(df) == "| policy | tok/s |\n|---|---|\n| tide | 14,400 |"


def test_gpu_check_steps_are_commands_the_cli_takes(tmp_path):
    """Every step of `make gpu-check` that calls the CLI parses there: an option misspelt in the plan would fail only
    on a lent GPU machine, with its minutes gone. Parsed and type-checked by click (nothing runs); the plan for the
    CPU (`--rehearse`) differs only in --device, which on this machine must be cpu to pass its check."""
    from tide.bench.gpu_check import BATCH_PROMPTS, plan
    from tide.cli import main

    names = [name for name, *_ in plan(sys.executable, tmp_path, "cuda", 8, tmp_path / "model")]
    assert names == ["pytest-gpu", "checkpoint", "calibrate", "bench-mini", "bench-batches"]
    steps = plan(sys.executable, tmp_path, "cpu", 8, tmp_path / "model")
    assert [name for name, *_ in steps] == names[1:]
    for name, cmd, limit_s, minimum_s in steps:
        assert cmd[1:3] == ["-m", "tide.cli"] and cmd[3:5] == ["--threads", "8"] and 0 < minimum_s <= limit_s, name
        group = main.make_context("tide", cmd[3:6])
        parsed = main.get_command(group, cmd[5]).make_context(cmd[5], cmd[6:], parent=group)
    batches = parsed.params  # the last step's
    assert (batches["batch_sizes"], batches["budgets"], batches["regimes"]) == ("1,4,16", "64/layer", "block-kv")
    assert batches["check"] and batches["projections"] == "h100-pcie5,a100-pcie4"  # the modelled rows, by default
    assert BATCH_PROMPTS.is_file() and len(BATCH_PROMPTS.read_text().splitlines()) == 16

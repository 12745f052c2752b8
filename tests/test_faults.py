"""Faults lose nothing: non-finite steps, another run in the output directory, a resume of a
different run, corrupt checkpoints and cache entries, signals, kill -9 and a full disk."""

from __future__ import annotations

import json
import logging
import math
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import base_config, crash_at, save_tiny_model
from preftune.engine.checkpoint import clean_leftovers, verify_checkpoint
from preftune.engine.faults import TrainingInterrupted
from preftune.methods.dpo import train_dpo

pytestmark = pytest.mark.usefixtures("one_thread")

WORKER = Path(__file__).with_name("fault_worker.py")
KILL = dict(max_steps=8, batch_size=4, save_steps=2, logging_steps=3, eval_steps=3)  # 32 pairs: one epoch




def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


def assert_identical(a: dict, b: dict) -> None:
    """Bit for bit: a resumed (or refused, or skipped-step) run against an uninterrupted one runs the very
    same kernels on the same batches in the same order, with one thread here (the one_thread fixture)
    and in fault_worker.py alike (and the same PREFTUNE_TEST_CPU_LINEAR): any difference is a lost state."""
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def rows(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def without_timing(rows: list[dict]) -> list[dict]:
    """Metrics rows less the wall-clock figure, to compare with ``==``: bit for bit, as assert_identical."""
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]


def nan_loss_at(monkeypatch, steps: set[int]) -> None:
    """The DPO loss of the given optimizer steps (1-based; one micro-batch each) becomes NaN."""
    from preftune.methods.dpo import DPOObjective

    original, calls = DPOObjective.loss, []

    def loss(self, batch):
        out = original(self, batch)
        if self.module.training:  # not the evaluation passes
            calls.append(1)
            if len(calls) in steps:
                return type(out)(out.loss * float("nan"), out.metrics)
        return out

    monkeypatch.setattr(DPOObjective, "loss", loss)


# -- numerical faults ---------------------------------------------------------------------------
def test_a_non_finite_step_is_skipped_counted_and_never_reaches_the_weights(tmp_path, monkeypatch, caplog):
    nan_loss_at(monkeypatch, {2})
    run = train_dpo(base_config(tmp_path, max_steps=4, save_steps=1))
    out = tmp_path / "out"
    assert [r["bad_steps"] for r in run.train.history] == [0, 1, 1, 1]
    assert "loss" not in run.train.history[1]  # the skipped step is not averaged into the logged row
    assert "step 2: loss nan, grad_norm nan: update skipped (1 in a row; max_bad_steps 3)" in caplog.text
    assert_identical(weights(out / "checkpoint-1"), weights(out / "checkpoint-2"))  # nothing applied
    head = [weights(out / f"checkpoint-{k}")["lm_head.weight"] for k in (2, 3)]
    assert not torch.equal(*head)  # the next step is applied
    assert all(torch.isfinite(t).all() for t in weights(run.train.final_dir).values())
    assert run.train.history[-1]["lr"] == pytest.approx(0.0)  # the schedule went on through the skipped step


def test_a_non_finite_gradient_norm_alone_is_a_bad_step():
    from preftune.engine.faults import BadSteps

    bad = BadSteps(limit=2)
    assert bad.ok(1, 0.7, 1.0) and not bad.ok(2, 0.7, float("inf")) and bad.ok(3, 0.7, 1.0)
    assert not bad.ok(4, 0.7, float("nan"))
    with pytest.raises(ValueError, match="at step 5: 2 steps in a row .* \\(last: grad_norm inf\\)"):
        bad.ok(5, 0.7, float("inf"))
    assert bad.state_dict() == {"total": 3, "in_a_row": 2}


def test_max_bad_steps_in_a_row_stop_the_run_with_one_clear_line(tmp_path, capsys):
    from preftune.cli import main

    cfg = base_config(tmp_path, learning_rate=1000.0, max_steps=10, save_steps=1)  # diverges after step 1
    args = ["dpo", *[x for k, v in cfg.items()
                     for x in (f"--{k}", str(v).lower() if isinstance(v, bool) else str(v))]]
    assert main(args) == 2
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if "error:" in x]
    assert line.startswith("preftune dpo: error: training stopped at step 4: 3 steps in a row had a "
                           "non-finite")
    assert "max_bad_steps: 3" in line
    assert f"the last checkpoint is {tmp_path / 'out' / 'checkpoint-3'}" in line
    out = tmp_path / "out"
    assert not (out / "final").exists() and not (out / "checkpoint-4").exists()
    for name in ("checkpoint-1", "checkpoint-2", "checkpoint-3"):
        assert all(torch.isfinite(t).all() for t in weights(out / name).values())
    assert [r["bad_steps"] for r in rows(out)] == [0, 1, 2]


def test_no_checkpoint_is_written_from_non_finite_weights(tmp_path):
    from accelerate import Accelerator

    from preftune.engine.faults import guarded_write

    module = torch.nn.Linear(2, 2)
    with torch.no_grad():
        module.weight[0, 0] = float("inf")
    written = []
    with pytest.raises(ValueError, match=r"not writing checkpoint-2: the weights hold non-finite values "
                                         r"after step 2 \(weight\); no earlier checkpoint exists"):
        guarded_write(Accelerator(cpu=True), tmp_path, "checkpoint-2", 2, module, lambda: written.append(1))
    assert written == []


# -- the run's identity and its output directory ------------------------------------------------
def test_resume_continues_only_the_same_run_and_says_what_differs(tmp_path, caplog):
    settings = dict(max_steps=6, batch_size=4, save_steps=2)
    with pytest.raises(KeyboardInterrupt):
        train_dpo(base_config(tmp_path, **settings), callbacks=[crash_at(3)])
    with pytest.raises(ValueError) as e:
        train_dpo(base_config(tmp_path, resume=True, **{**settings, "batch_size": 8}, learning_rate=2e-3,
                              seed=1))
    assert str(e.value).startswith(f"resume: {tmp_path / 'out' / 'checkpoint-2'} belongs to a different run: "
                                   "global_batch 4 -> 8, learning_rate 0.001 -> 0.002, seed 0 -> 1; ")
    from helpers import write_pairs

    write_pairs(tmp_path / "other.jsonl", seed=3)
    with pytest.raises(ValueError,
                       match=r"different run: train_data [0-9a-f]{12}\.\.\. -> [0-9a-f]{12}\.\.\."):
        train_dpo(base_config(tmp_path, resume=True, train_file=str(tmp_path / "other.jsonl"),
                              **settings))
    # the same data under another name, other logging and saving, a longer run: the same run
    shutil.copy(tmp_path / "train.jsonl", tmp_path / "moved.jsonl")
    with caplog.at_level(logging.INFO, logger="preftune"):
        run = train_dpo(base_config(tmp_path, resume=True, train_file=str(tmp_path / "moved.jsonl"),
                                    logging_steps=2, save_total_limit=1,
                                    **{**settings, "max_steps": 8, "save_steps": 3}))
    assert "resume: max_steps 6 -> 8: the run's length changed" in caplog.text
    assert [r["step"] for r in run.train.history] == [4, 6, 8]


def test_a_used_output_dir_is_refused_without_resume_or_overwrite(tmp_path):
    first = train_dpo(base_config(tmp_path, max_steps=4, save_steps=2))
    out, before = tmp_path / "out", weights(first.train.final_dir)
    (out / "notes.txt").write_text("mine")
    message = (f"output_dir {out} already holds a run (metrics.jsonl, run_identity.json, final, "
               "checkpoint-2); set resume: true to continue it, overwrite: true to replace it, or choose "
               "another output_dir")
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        train_dpo(base_config(tmp_path, max_steps=3, learning_rate=2e-3))
    assert_identical(weights(out / "final"), before)  # untouched
    from preftune.engine.faults import check_output_dir
    from preftune.methods.dpo import DPOConfig

    with pytest.raises(ValueError, match="already holds a run"):  # the same check, before anything loads
        check_output_dir(DPOConfig(**base_config(tmp_path)))
    check_output_dir(DPOConfig(**base_config(tmp_path, resume=True)))
    second = train_dpo(base_config(tmp_path, max_steps=3, learning_rate=2e-3, overwrite=True))
    assert [r["step"] for r in rows(out)] == [1, 2, 3] and not (out / "checkpoint-2").exists()
    assert (out / "notes.txt").read_text() == "mine"  # not a run's file
    assert not torch.equal(weights(second.train.final_dir)["lm_head.weight"], before["lm_head.weight"])
    with pytest.raises(ValueError, match="resume and overwrite exclude each other"):
        train_dpo(base_config(tmp_path, resume=True, overwrite=True))


def test_resume_logs_every_step_once_with_the_values_of_an_uninterrupted_run(tmp_path):
    settings = dict(max_steps=6, batch_size=4, save_steps=2, logging_steps=3)  # checkpoint 4 is mid-window
    whole = train_dpo(base_config(tmp_path, output_dir=str(tmp_path / "whole"), **settings))
    with pytest.raises(KeyboardInterrupt):
        train_dpo(base_config(tmp_path, output_dir=str(tmp_path / "cut"), **settings),
                  callbacks=[crash_at(5)])
    resumed = train_dpo(base_config(tmp_path, output_dir=str(tmp_path / "cut"), resume=True, **settings))
    assert [r["step"] for r in resumed.train.history] == [6]
    assert without_timing(rows(tmp_path / "cut")) == without_timing(rows(tmp_path / "whole"))
    assert_identical(weights(whole.train.final_dir), weights(resumed.train.final_dir))


def test_identity_ignores_free_keys_and_reads_new_keys_as_their_default(tmp_path):
    from preftune.engine.faults import RunIdentity
    from preftune.methods.dpo import DPOConfig

    a = RunIdentity.of(DPOConfig(train_file="a.jsonl"), "f" * 64)
    b = RunIdentity.of(DPOConfig(train_file="b.jsonl", output_dir="x", logging_steps=1, save_steps=5,
                                 progress_bar=False, max_steps=9), "f" * 64)
    assert a.hash == b.hash
    assert b.check(a.to_json(), "here") == [
        "resume: max_steps null -> 9: the run's length changed; the learning-rate schedule follows the new "
        "length"]
    old = a.to_json()
    del old["settings"]["layout"]  # a checkpoint written before a key existed: it had the default
    old["hash"] = "?"
    assert a.check(old, "here") == []
    with pytest.raises(ValueError, match="different run: layout \"prefix_shared\" -> \"padded\""):
        RunIdentity.of(DPOConfig(train_file="a.jsonl", layout="padded"), "f" * 64).check(old, "here")


# -- checkpoints --------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "missing file"])
def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, damage, caplog):
    settings = dict(max_steps=6, batch_size=4, save_steps=2)
    whole = train_dpo(base_config(tmp_path, output_dir=str(tmp_path / "whole"), **settings))
    with pytest.raises(KeyboardInterrupt):
        train_dpo(base_config(tmp_path, output_dir=str(tmp_path / "cut"), **settings),
                  callbacks=[crash_at(5)])
    latest = tmp_path / "cut" / "checkpoint-4"
    target = latest / ("model.safetensors" if damage != "missing file" else "optimizer.pt")
    data = bytearray(target.read_bytes())
    if damage == "flipped byte":
        data[-5] ^= 0x10
        target.write_bytes(bytes(data))
    elif damage == "truncated":
        target.write_bytes(bytes(data[: len(data) // 2]))
    else:
        target.unlink()
    assert verify_checkpoint(latest) is not None
    resumed = train_dpo(base_config(tmp_path, output_dir=str(tmp_path / "cut"), resume=True, **settings))
    assert "checkpoint-4 is unusable" in caplog.text and "falling back to an older one" in caplog.text
    assert [r["step"] for r in resumed.train.history] == [3, 4, 5, 6]
    assert_identical(weights(whole.train.final_dir), weights(resumed.train.final_dir))
    assert [r["step"] for r in rows(tmp_path / "cut")] == [1, 2, 3, 4, 5, 6]


def test_save_total_limit_keeps_the_newest_checkpoints(tmp_path):
    train_dpo(base_config(tmp_path, max_steps=6, save_steps=1, save_total_limit=2))
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(("checkpoint", "."))) == [
        "checkpoint-4", "checkpoint-5"]


def test_leftovers_of_interrupted_writes_are_removed_or_restored(tmp_path):
    for name in (".tmp-checkpoint-6-abc", ".old-final", "final", ".old-checkpoint-2"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "x").write_text(name)
    (tmp_path / ".tmp-metrics.jsonl").write_text("")
    done = clean_leftovers(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "final"]
    # put back: its target was missing
    assert (tmp_path / "checkpoint-2" / "x").read_text() == ".old-checkpoint-2"
    assert (tmp_path / "final" / "x").read_text() == "final"
    assert len(done) == 4


# -- signals, kill -9, a full disk --------------------------------------------------------------
def worker(config: dict, cue: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(WORKER), json.dumps(config), *([cue] if cue else [])],
                          capture_output=True, text=True, timeout=timeout)


def test_sigint_finishes_the_step_writes_a_checkpoint_and_exits_resumably(tmp_path, monkeypatch):
    import os

    from preftune.engine.loop import Trainer

    settings = dict(max_steps=6, batch_size=4)
    whole = train_dpo(base_config(tmp_path, output_dir=str(tmp_path / "whole"), **settings))
    original = Trainer._train_step

    def interrupted_step(self, module, step):
        out = original(self, module, step)
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(Trainer, "_train_step", interrupted_step)
    handler = signal.getsignal(signal.SIGINT)
    cut = tmp_path / "cut"
    with pytest.raises(TrainingInterrupted) as e:
        train_dpo(base_config(tmp_path, output_dir=str(cut), **settings))
    assert e.value.code == 130 and str(e.value) == (
        f"stopped by SIGINT after step 3 of 6; checkpoint written to {cut / 'checkpoint-3'}; "
        "run again with resume: true to continue")
    assert signal.getsignal(signal.SIGINT) is handler  # the previous handler is back
    assert verify_checkpoint(cut / "checkpoint-3") is None and not (cut / "final").exists()
    monkeypatch.setattr(Trainer, "_train_step", original)
    resumed = train_dpo(base_config(tmp_path, output_dir=str(cut), resume=True, **settings))
    assert_identical(weights(whole.train.final_dir), weights(resumed.train.final_dir))


def test_a_second_signal_stops_at_once_and_handlers_are_restored():
    import os

    from preftune.engine.faults import StopSignals

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.received == signal.SIGTERM  # the first one only asks
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)
    assert signal.getsignal(signal.SIGTERM) is before


def test_sigterm_in_a_child_process_exits_143_after_a_checkpoint(tmp_path):
    config = base_config(tmp_path, max_steps=6, batch_size=4)
    proc = worker(config, "sigterm:2")
    assert proc.returncode == 143, proc.stderr[-2000:]
    out = tmp_path / "out"
    assert (f"stopped by SIGTERM after step 2 of 6; checkpoint written to {out / 'checkpoint-2'}"
            in proc.stderr)
    assert "Traceback" not in proc.stderr
    assert verify_checkpoint(out / "checkpoint-2") is None
    assert [r["step"] for r in rows(out)] == [1, 2]


def check_against_uninterrupted(tmp_path: Path, out: Path, **settings) -> None:
    whole = train_dpo(base_config(tmp_path, output_dir=str(tmp_path / "whole"),
                                  reference_cache_dir=str(tmp_path / "whole-cache"), **settings))
    assert_identical(weights(whole.train.final_dir), weights(out / "final"))
    got, expected = rows(out), rows(tmp_path / "whole")
    # train + eval rows
    assert [r["step"] for r in got] == [r["step"] for r in expected] == [3, 3, 6, 6, 8, 8]
    assert without_timing(got) == without_timing(expected)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def kill_and_resume(tmp_path: Path, cues: list[str]) -> Path:
    config = base_config(tmp_path, eval_file=str(tmp_path / "train.jsonl"),
                         reference_cache_dir=str(tmp_path / "cache"), resume=True, **KILL)
    for cue in cues:
        proc = worker(config, cue)
        assert proc.returncode == -signal.SIGKILL, (cue, proc.returncode, proc.stderr[-3000:])
    proc = worker(config)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return Path(config["output_dir"])


def test_kill_9_mid_precompute_mid_checkpoint_and_mid_step_then_resume_is_exact(tmp_path):
    out = kill_and_resume(tmp_path, ["precompute:3", "save:4", "step:5"])
    check_against_uninterrupted(tmp_path, out, eval_file=str(tmp_path / "train.jsonl"), **KILL)


@pytest.mark.slow
def test_kill_9_at_every_kind_of_moment_then_resume_is_exact(tmp_path):
    cues = ["cache-write", "step:1", "save:2", "metrics:3", "step:4", "save:6", "metrics:8", "final"]
    out = kill_and_resume(tmp_path, cues)  # each resumes from the checkpoint the one before left
    check_against_uninterrupted(tmp_path, out, eval_file=str(tmp_path / "train.jsonl"), **KILL)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_kill_9_at_random_times_then_resume_is_exact(tmp_path, seed):
    config = base_config(tmp_path, eval_file=str(tmp_path / "train.jsonl"),
                         reference_cache_dir=str(tmp_path / "cache"), resume=True, **KILL)
    rng = random.Random(seed)
    for _ in range(5):  # killed after 1.5-7 s: while loading, precomputing, training, saving, ...
        proc = subprocess.Popen([sys.executable, str(WORKER), json.dumps(config)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            proc.wait(timeout=rng.uniform(1.5, 7.0))
        except subprocess.TimeoutExpired:
            proc.kill()
        _, err = proc.communicate()
        assert proc.returncode in (0, -signal.SIGKILL), err[-3000:]
    proc = worker(config)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_against_uninterrupted(tmp_path, Path(config["output_dir"]), eval_file=str(tmp_path / "train.jsonl"),
                                **KILL)


def test_a_full_disk_on_save_leaves_the_last_good_checkpoint_readable_and_says_so(tmp_path):
    settings = dict(max_steps=6, batch_size=4, save_steps=2)
    config = base_config(tmp_path, **settings)
    # files may not grow past 40 kB from step 3: checkpoint-4 cannot be written
    proc = worker(config, "fsize:3")
    out = tmp_path / "out"
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("preftune.engine.checkpoint.CheckpointWriteError: "
                           f"could not write {out / 'checkpoint-4'} (")
    assert last.endswith(f"is the disk full? the last good checkpoint, {out / 'checkpoint-2'}, is untouched "
                         "and readable: resume: true continues from it")
    assert verify_checkpoint(out / "checkpoint-2") is None
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "metrics.jsonl", "run_identity.json"]
    resumed = train_dpo({**config, "resume": True})
    whole = train_dpo(base_config(tmp_path, output_dir=str(tmp_path / "whole"), **settings))
    assert_identical(weights(whole.train.final_dir), weights(resumed.train.final_dir))


# -- the reference cache ------------------------------------------------------------------------
def cache_entries(cache: Path) -> list[Path]:
    return sorted(cache.glob("ref-*.safetensors"))


def test_a_flipped_bit_in_the_reference_cache_is_detected_and_recomputed(tmp_path, caplog):
    cache = tmp_path / "cache"
    first = train_dpo(base_config(tmp_path, output_dir=str(tmp_path / "a"), reference_cache_dir=str(cache)))
    # policy == reference at step 1: margins 0 up to the rounding of sums in other batches (~1e-5 nats),
    # so the loss is log 2 to ~beta * 1e-5 / 2; a stale or corrupt reference is off by ~beta * 1 nat
    assert first.train.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    (entry,) = cache_entries(cache)
    data = bytearray(entry.read_bytes())
    data[-3] ^= 0x40  # a bit of a stored value
    entry.write_bytes(bytes(data))
    again = train_dpo(base_config(tmp_path, output_dir=str(tmp_path / "b"), reference_cache_dir=str(cache)))
    assert "corrupt: its values do not match their checksum; recomputing it" in caplog.text
    assert again.reference_cache_reused is False
    assert again.train.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert_identical(weights(first.train.final_dir), weights(again.train.final_dir))


def test_a_model_config_change_with_the_same_weights_gets_its_own_cache_entry(tmp_path):
    save_tiny_model(tmp_path / "model")
    shutil.copytree(tmp_path / "model", tmp_path / "rope")
    config = json.loads((tmp_path / "rope" / "config.json").read_text())
    config["rope_parameters"]["rope_theta"] = 500.0
    (tmp_path / "rope" / "config.json").write_text(json.dumps(config))
    common = dict(reference_cache_dir=str(tmp_path / "cache"), max_steps=4, tokenizer=str(tmp_path / "model"))
    a = train_dpo(base_config(tmp_path, output_dir=str(tmp_path / "a"), **common))
    b = train_dpo(base_config(tmp_path, output_dir=str(tmp_path / "b"), model=str(tmp_path / "rope"),
                              **common))
    assert a.reference_cache != b.reference_cache and b.reference_cache_reused is False


def small_cache(tmp_path: Path, identity: dict | None = None, frozen=None):
    """A 6-pair cache entry under key ``k`` in ``tmp_path/cache``."""
    from helpers import random_pairs, tiny_llama
    from preftune.data.batching import collate
    from preftune.model.reference import FrozenReference, precompute_reference

    pairs = random_pairs(6, seed=5)
    frozen = frozen or FrozenReference(tiny_llama())
    batches = [collate(pairs[:3], range(3)), collate(pairs[3:], range(3, 6))]
    return precompute_reference(frozen, batches, 6, tmp_path / "cache", "k", identity=identity or {"w": 1})


@pytest.mark.parametrize("damage", ["truncated", "empty", "stale", "older format", "flipped bit"])
def test_a_partial_corrupt_or_stale_cache_entry_is_recomputed_never_read(tmp_path, damage, caplog):
    from safetensors.torch import save_file

    good = small_cache(tmp_path)
    path = good.path
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) - 7])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "stale":  # an entry of other weights under this key
        small_cache(tmp_path / "other", identity={"w": 2})
        shutil.copy(tmp_path / "other" / "cache" / path.name, path)
    elif damage == "older format":
        names = ("chosen", "rejected", "chosen_tokens", "rejected_tokens")
        save_file({k: getattr(good, k) for k in names}, str(path))
    else:
        path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    again = small_cache(tmp_path)
    assert again.reused is False and "recomputing it" in caplog.text
    # bitwise: the same frozen model scores the same batches again in this process
    assert torch.equal(again.chosen, good.chosen) and torch.equal(again.rejected, good.rejected)
    assert small_cache(tmp_path).reused is True  # the rewritten entry verifies


def test_two_writers_filling_one_cache_key_never_expose_a_partial_entry(tmp_path, monkeypatch):
    from safetensors.torch import save

    import preftune.model.reference as reference
    from helpers import tiny_llama

    both_writing = threading.Barrier(2, timeout=30)

    def slow_save_file(tensors, path, metadata=None):  # writes in small pieces, as a slow disk would
        both_writing.wait()  # two writers at once, each past its check that no entry exists
        data = save(tensors, metadata=metadata)
        with open(path, "wb") as f:
            for i in range(0, len(data), 64):
                f.write(data[i : i + 64])
                f.flush()
                time.sleep(0.002)

    monkeypatch.setattr(reference, "save_file", slow_save_file)
    seen, stop = [], threading.Event()
    path = tmp_path / "cache" / "ref-k.safetensors"

    def reader():
        while not stop.is_set():
            seen.append(reference.read_cache_entry(path, {"w": 1}, 6)[1])

    results: list = []
    frozen = reference.FrozenReference(tiny_llama())
    fill = lambda: results.append(small_cache(tmp_path, frozen=frozen))  # noqa: E731
    threads = [threading.Thread(target=fill) for _ in range(2)]
    watcher = threading.Thread(target=reader)
    watcher.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    watcher.join()
    assert len(results) == 2 and len(seen) > 10
    assert set(seen) <= {""}  # never a partial entry: none yet, or a whole one
    assert reference.read_cache_entry(path, {"w": 1}, 6)[0] is not None
    assert not list(path.parent.glob(".tmp-*"))


def test_new_config_fields_are_checked():
    from preftune.methods.dpo import DPOConfig

    with pytest.raises(ValueError, match="max_bad_steps must be >= 1"):
        DPOConfig(train_file="t.jsonl", max_bad_steps=0)
    with pytest.raises(ValueError, match="save_total_limit must be >= 1"):
        DPOConfig(train_file="t.jsonl", save_total_limit=0)


def test_resuming_with_fewer_steps_than_the_checkpoint_is_one_line(tmp_path):
    """A checkpoint past the resumed run's length leaves nothing to train: one line saying so, and no
    final model written from it (it used to write one and report a NaN final loss)."""
    config = base_config(tmp_path, max_steps=6, save_steps=4)
    with pytest.raises(KeyboardInterrupt):
        train_dpo(config, callbacks=[crash_at(5)])
    with pytest.raises(ValueError, match=r"^resume: checkpoint-4 is at step 4, past this run's 2 steps; "
                                         r"raise max_steps \(or epochs\) to at least 4$"):
        train_dpo({**config, "resume": True, "max_steps": 2})
    assert not (tmp_path / "out" / "final").exists()
    assert train_dpo({**config, "resume": True}).train.steps == 6  # the same run, resumed to its length

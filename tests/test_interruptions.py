"""Interruptions lose nothing. kill -9 at seeded random moments of a tiny recipe run, halfway through writing a
checkpoint and while the final adapter is moved into place; then `--resume_from_checkpoint auto` ends at the very
tensors of an uninterrupted run. A half-written checkpoint is skipped with a warning and never loaded; Ctrl-C saves
a checkpoint and stops; a second run on the same --output_dir refuses in one line. docs/reliability.md lists them."""

import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_recipes import run  # the recipe in this process, as the Trainer pickles it

from longqlora.data.corpora import book_path
from longqlora.training import checkpoints

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "extend_7b_8k"
ARGS = ["--tiny", "--seed", "3"]  # 4 steps of a tiny random Llama, a checkpoint every 2
# Seeds of the random kill moments: one by default (the suite stays short); LONGQLORA_KILL_TRIALS=N runs seeds 1..N.
TRIALS = int(os.environ.get("LONGQLORA_KILL_TRIALS", "0"))
RANDOM_KILLS = list(range(1, TRIALS + 1)) if TRIALS else [5]
# Every run here (the reference, the killed ones, the resumed ones) on one CPU thread: with two, an uninterrupted run
# of the same seed ends in different last bits about one time in ten (a parallel reduction's order), which no
# interruption causes; bit-identical resumption is what these tests check.
THREADS = 1


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run, in its own process: its final adapter's tensors, its training span (seconds from its
    first logged loss until its final adapter is in place: where a random kill may land), its folder."""
    out = tmp_path_factory.mktemp("whole") / "run"
    process = start(out)
    first = until_first_loss(process, out)
    published = None
    while process.poll() is None:
        if published is None and (out / "adapter_config.json").exists():
            published = time.perf_counter()
        time.sleep(0.02)
    assert process.wait() == 0 and first is not None, Path(f"{out}.log").read_text()[-3000:]
    return load_file(out / "adapter_model.safetensors"), (published or time.perf_counter()) - first, out


def start(out: Path, point: str = "none") -> subprocess.Popen:
    """The recipe in its own process (tests/kill_points.py kills it at `point`); its output goes to <out>.log."""
    log = open(f"{out}.log", "w")
    return subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "tests" / "kill_points.py"),
            point,
            str(ROOT / "recipes" / f"{RECIPE}.py"),
            *ARGS,
            "--output_dir",
            str(out),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(THREADS)},
    )


def until_first_loss(process: subprocess.Popen, out: Path) -> float | None:
    """Wait until the run logs its first loss (training under way; a step done); the time of it, or None when the
    process ended first."""
    log, deadline = Path(f"{out}.log"), time.monotonic() + 300
    while "'loss'" not in log.read_text() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    return time.perf_counter() if "'loss'" in log.read_text() else None


def resume(out: Path, monkeypatch, caplog):
    """--resume_from_checkpoint auto in this process; returns (final tensors, [(file, weights_only)] of every
    torch.load, the checkpoint log)."""
    loads, real_load = [], torch.load

    def spy(f, *args, **kwargs):
        loads.append((str(f), kwargs.get("weights_only")))
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        with caplog.at_level(logging.INFO, logger="longqlora.training.checkpoints"):
            adapter = run(RECIPE, *ARGS, "--output_dir", str(out), "--resume_from_checkpoint", "auto")
    finally:
        torch.set_num_threads(threads)
    monkeypatch.undo()
    assert loads == [(f, True) for f, _ in loads], "a torch.load without weights_only=True"
    return load_file(adapter / "adapter_model.safetensors"), loads, caplog.text


def identical(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def on_disk(out: Path) -> str:
    """What a killed run left: each checkpoint (complete or why not) and whether the final adapter is there."""
    parts = [
        f"{p.name}: {checkpoints.checkpoint_problem(p) or 'complete'}"
        for p in sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    ]
    return "; ".join(parts + [f"adapter config {'present' if (out / 'adapter_config.json').exists() else 'absent'}"])


def kill_in_training(out: Path, delay: float) -> subprocess.Popen:
    """The recipe started into `out` and killed -9 `delay` s after its first logged loss, unless it ended first.
    Timed from the first loss, not from the start, so a slow start (a loaded machine) does not move the kill past
    the end of training."""
    process = start(out)
    until_first_loss(process, out)
    try:
        process.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
        process.wait()
    return process


@pytest.mark.parametrize("seed", RANDOM_KILLS)
def test_kill_9_at_a_random_moment_then_resume(seed, reference, tmp_path, monkeypatch, caplog):
    tensors, span, _ = reference
    delay = 0.9 * span * random.Random(seed).random()  # from the first logged loss to just before the final save
    for attempt in range(3):
        out = tmp_path / f"run{attempt}"
        process = kill_in_training(out, delay)
        if process.returncode == -signal.SIGKILL and not (out / "adapter_config.json").exists():
            break
        delay /= 2  # it trained faster than the reference (which started colder) and finished first: kill earlier
    assert process.returncode == -signal.SIGKILL, (
        f"exit {process.returncode} before the kill at {delay:.1f} s: " + Path(f"{out}.log").read_text()[-3000:]
    )
    assert not (out / "adapter_config.json").exists(), f"killed after the final adapter was written: {on_disk(out)}"
    steps = Path(f"{out}.log").read_text().count("'loss'")
    assert steps >= 1  # killed in training, after its first step
    left = f"{steps} steps logged, {on_disk(out)}"
    with checkpoints.output_lock(out):  # kill -9 leaves no stale lock behind
        pass
    final, _, log = resume(out, monkeypatch, caplog)
    print(
        f"kill -9 {delay:.2f} s after the first logged loss of a {span:.2f} s training span (try {attempt + 1}): "
        f"{left}; bit-identical {identical(final, tensors)}"
    )
    assert identical(final, tensors)


def test_kill_9_while_writing_a_checkpoint_skips_it(reference, tmp_path, monkeypatch, caplog):
    tensors = reference[0]
    out = tmp_path / "run"
    assert start(out, "save:optimizer.pt:4").wait() == -signal.SIGKILL
    half = out / "checkpoint-4"
    assert (half / "optimizer.pt").stat().st_size < (out / "checkpoint-2" / "optimizer.pt").stat().st_size
    assert checkpoints.checkpoint_problem(half).startswith("no trainer_state.json")
    assert checkpoints.checkpoint_problem(out / "checkpoint-2") == ""
    final, loads, log = resume(out, monkeypatch, caplog)
    assert f"skipping {half}: no trainer_state.json" in log and "moved to incomplete-checkpoint-4, never loaded" in log
    assert f"resuming from {out / 'checkpoint-2'}" in log
    assert loads and all(Path(f).parent == out / "checkpoint-2" for f, _ in loads)  # optimizer, scheduler, RNG
    assert identical(final, tensors)
    assert checkpoints.checkpoint_problem(half) == "" and not list(out.glob("incomplete-*"))
    # the record's mean loss is the whole run's (the Trainer's covers only the steps after the resume)
    train, whole = (json.loads((d / "longqlora_extension.json").read_text())["train"] for d in (out, reference[2]))
    assert train["mean_loss"] == pytest.approx(whole["mean_loss"], 1e-3) and train["resumed_at_step"] == 2
    assert train["last_loss"] == pytest.approx(whole["last_loss"], 1e-3) and train["tokens_total"] == whole["tokens"]
    # tokens and seconds are of the same span: this call's, from checkpoint-2 on
    at_2 = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["num_input_tokens_seen"]
    assert 0 < train["tokens"] == whole["tokens"] - at_2 and train["seconds"] > 0


def test_kill_9_while_publishing_the_adapter_then_resume(reference, tmp_path, monkeypatch, caplog):
    tensors = reference[0]
    out = tmp_path / "run"
    assert start(out, "publish").wait() == -signal.SIGKILL
    assert (out / "adapter_model.safetensors").exists() and not (out / "adapter_config.json").exists()
    final, _, log = resume(out, monkeypatch, caplog)
    assert "checkpoint-4 holds the last step (4): the adapter is written from it" in log
    assert not (out / "checkpoint-5").exists()  # the Trainer, resumed at its last step, would train one more
    assert identical(final, tensors)
    recorded = lambda d: json.loads((d / "longqlora_extension.json").read_text())  # noqa: E731
    assert recorded(out)["s2_options"] == recorded(reference[2])["s2_options"]  # the schedule the run was set for
    # the run's mean loss, as the uninterrupted run records it (from the logged losses: rounded to 4 digits)
    assert recorded(out)["train"]["mean_loss"] == pytest.approx(recorded(reference[2])["train"]["mean_loss"], 1e-3)


def test_ctrl_c_saves_a_checkpoint_and_stops(reference, tmp_path, monkeypatch, caplog):
    tensors = reference[0]
    out = tmp_path / "run"
    process = start(out)
    log = Path(f"{out}.log")
    until_first_loss(process, out)  # the first step is logged: training, under the signal handler
    with pytest.raises(ValueError, match="another run is writing there"):
        with checkpoints.output_lock(out):  # the running run holds its output directory
            pass
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=300) == 130
    text = log.read_text()
    last = text.strip().splitlines()[-1]
    assert last.startswith("interrupted: SIGINT at step ") and len(last) < 300 and "Traceback" not in text, last
    step = int(last.split("at step ")[1].split()[0])
    assert 1 <= step < 4 and checkpoints.checkpoint_problem(out / f"checkpoint-{step}") == ""
    assert not (out / "adapter_config.json").exists()  # an unfinished run writes no final adapter
    assert identical(resume(out, monkeypatch, caplog)[0], tensors)


def test_a_signal_during_an_evaluation_or_save_stops_at_that_checkpoint():
    """Ctrl-C while a step's evaluation or checkpoint runs (after the step's end, where the guard looks first):
    training stops once that checkpoint is saved, not after one more step; several processes agree on a signal at
    a step's end only, so they go on to it."""
    from transformers import TrainerControl, TrainerState

    class Args:
        world_size = 1

    guard, state = checkpoints.CheckpointGuard(), TrainerState(global_step=2)
    assert not guard.on_save(Args(), state, TrainerControl()).should_training_stop  # no signal: train on
    guard.stop_signal = "SIGINT"
    assert guard.on_save(Args(), state, TrainerControl()).should_training_stop
    Args.world_size = 2
    assert not guard.on_save(Args(), state, TrainerControl()).should_training_stop


def test_a_second_run_on_the_same_output_dir_refuses(reference, tmp_path):
    out = tmp_path / "run"
    argv = [
        sys.executable,
        str(ROOT / "recipes" / f"{RECIPE}.py"),
        "--model_name_or_path",
        str(reference[2] / "tiny-base"),
        "--target_context",
        "256",
        "--compute_dtype",
        "float32",
        "--attn_backend",
        "sdpa",
        "--dataset",
        book_path("austen_persuasion"),
        "--output_dir",
        str(out),
    ]
    with checkpoints.output_lock(out):  # what a running run holds
        before = sorted(p.name for p in out.iterdir())
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}
        )
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert last == (
        f"error: --output_dir {out}: another run is writing there (it holds .longqlora.lock); wait for "
        "it to end or choose another --output_dir"
    )
    assert sorted(p.name for p in out.iterdir()) == before == [".longqlora.lock"]


def test_an_incomplete_checkpoint_named_explicitly_is_refused(tmp_path):
    half = tmp_path / "checkpoint-6"
    half.mkdir()
    (half / "adapter_model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match=r"--resume_from_checkpoint .*checkpoint-6: no trainer_state.json"):
        checkpoints.resume_checkpoint(tmp_path, str(half))
    (half / "trainer_state.json").write_text('{"global_step": 6}')
    assert checkpoints.checkpoint_problem(half) == "adapter_model.safetensors is damaged"


def test_a_new_run_refuses_an_output_dir_with_an_earlier_runs_checkpoints(tmp_path):
    """Resumed later with auto, a new run in that folder would take the other run's newest checkpoint."""
    (tmp_path / "checkpoint-1000").mkdir()
    (tmp_path / "checkpoint-500").mkdir()
    for requested in (None, "", "false"):
        with pytest.raises(ValueError, match=r"holds an earlier run's checkpoints \(checkpoint-1000, 2 in all\)"):
            checkpoints.check_new_run(tmp_path, requested)
    checkpoints.check_new_run(tmp_path, "auto")  # resuming is what the folder is for
    checkpoints.check_new_run(tmp_path / "elsewhere", None)
    assert checkpoints.resume_checkpoint(tmp_path, "auto") is None  # neither is complete: both moved aside
    assert sorted(p.name for p in tmp_path.iterdir()) == ["incomplete-checkpoint-1000", "incomplete-checkpoint-500"]
    checkpoints.check_new_run(tmp_path, None)  # folders moved aside are no earlier run


def test_a_new_run_refuses_an_output_dir_holding_what_it_did_not_write(tmp_path):
    """A finished run's adapter (its checkpoints deleted) or the user's files would be written over or mixed with;
    the lock, --tiny's base and checkpoints moved aside are a run's own."""
    for folder in ("tiny-base", "incomplete-checkpoint-3"):
        (tmp_path / folder).mkdir()
    for lock in (".longqlora.lock", ".tiny-base.lock"):
        (tmp_path / lock).touch()
    (tmp_path / ".tiny-base.partial-123-abc").mkdir()  # the main process writing it while another process checks
    checkpoints.check_new_run(tmp_path, None)
    for name in ("adapter_config.json", "adapter_model.safetensors", "README.md", "notes.txt"):
        (tmp_path / name).touch()
    with pytest.raises(ValueError) as refused:
        checkpoints.check_new_run(tmp_path, None)
    assert str(refused.value) == (
        f"--output_dir {tmp_path} holds a finished run's adapter (README.md, adapter_config.json, "
        "adapter_model.safetensors and 1 more), which a new run would write over or among: choose a new or empty "
        "--output_dir"
    )
    (tmp_path / "adapter_config.json").unlink()
    with pytest.raises(ValueError, match="holds files that are not a run's"):
        checkpoints.check_new_run(tmp_path, None)
    checkpoints.check_new_run(tmp_path, "auto")  # resuming looks for checkpoints there


def test_a_weights_only_checkpoint_is_refused_not_discarded(tmp_path):
    """A checkpoint saved with --save_only_model true, resumed without it: one line, and the folder stays."""
    from safetensors.torch import save_file

    folder = tmp_path / "checkpoint-4"
    folder.mkdir()
    save_file({"w": torch.zeros(2)}, str(folder / "adapter_model.safetensors"))
    (folder / "trainer_state.json").write_text('{"global_step": 4}')
    with pytest.raises(
        ValueError, match=r"checkpoint-4 holds weights but no optimizer.pt, scheduler.pt, rng_state.pth"
    ):
        checkpoints.resume_checkpoint(tmp_path, "auto")
    assert folder.is_dir()
    assert checkpoints.resume_checkpoint(tmp_path, "auto", with_optimizer=False) == str(folder)

"""The training engine (DESIGN §5): the default run learns on real anatomy, fast and reference
steps agree, resume is bit-exact, checkpoints fail clearly, DDP replicas stay identical."""

from __future__ import annotations

import csv
import os
import platform
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from common import rel_err

from gvsl_fast.cli import main
from gvsl_fast.models import GVSL, UNet3D
from gvsl_fast.train import checkpoint, host_memory, loop
from gvsl_fast.train.config import TrainConfig
from gvsl_fast.train.distributed import DistInfo
from gvsl_fast.train.logs import LOSSES, TRAIN_COLUMNS
from gvsl_fast.train.loop import pretrain

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


def _history(out: Path) -> list[dict]:
    with (out / "history.csv").open() as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def cohort_cache(tmp_path_factory) -> Path:
    """One embedded-cohort cache shared by the runs below (built once)."""
    return tmp_path_factory.mktemp("cohort")


def _cfg(out: Path, cache: Path, **kw) -> TrainConfig:
    # keep_last=1: a checkpoint of the paper's model (with Adam's moments) is ~390 MB
    base = dict(out=out, steps=4, patch=(16, 16, 16), spacing=2.0, batch_size=1, save_every=2,
                keep_last=1, progress=False, workers=0, loader="torch")
    base.update(kw)
    return TrainConfig(cache=str(cache), **base)


@pytest.mark.slow
def test_default_amp_run_learns_on_real_anatomy(tmp_path, cohort_cache, monkeypatch, capsys):
    """`gvsl-fast pretrain --amp` on the embedded MNI152 cohort: on the fixed evaluation pair the
    total and NCC losses go down, and the run folder holds a checkpoint, the CSV histories and
    both pictures. The CPU run says how it set malloc."""
    monkeypatch.setenv("GVSL_FAST_CACHE", str(cohort_cache))
    out = tmp_path / "run"
    code = main(["pretrain", "--amp", "--out", str(out), "--steps", "60", "--patch", "32",
                 "--save-every", "30", "--keep-last", "1", "--no-progress", "--lr", "3e-4"])
    assert code == 0
    assert "gvsl-fast: CPU training: " in capsys.readouterr().err
    assert len(_history(out)) == 60
    with (out / "eval.csv").open() as f:
        evals = list(csv.DictReader(f))
    assert [int(r["step"]) for r in evals] == [0, 30, 60]
    first, last = evals[0], evals[-1]
    assert float(last["loss"]) < float(first["loss"])
    assert float(last["ncc"]) < float(first["ncc"])
    assert checkpoint.list_checkpoints(out)[-1].name == "ckpt_00000060.pt"
    for png in ("loss_curves.png", "registration_preview.png"):
        assert (out / png).read_bytes()[:8] == PNG


HEAP_PROBE = """
import torch
from gvsl_fast.train.host_memory import keep_freed_memory

def in_heap(t):  # whether t lies in the brk heap, not in a block mmapped for it alone
    for line in open("/proc/self/maps"):
        if line.rstrip().endswith("[heap]"):
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            return lo <= t.data_ptr() < hi
    return False

before = in_heap(torch.empty(64 << 20, dtype=torch.uint8))  # past glibc's own 32 MiB at most
print(keep_freed_memory())
print(before, in_heap(torch.empty(64 << 20, dtype=torch.uint8)))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc")
@pytest.mark.parametrize("user_setting", [None, "MALLOC_MMAP_THRESHOLD_"])
def test_cpu_training_keeps_freed_memory_for_reuse(user_setting):
    """keep_freed_memory (what `pretrain` on the CPU calls first): a 64 MiB block, mmapped on
    its own before, comes from the heap after; a malloc setting in the environment is left as
    the user made it."""
    env = {k: v for k, v in os.environ.items() if k not in host_memory.USER_SETTINGS}
    if user_setting:
        env[user_setting] = str(1 << 20)
    proc = subprocess.run([sys.executable, "-c", HEAP_PROBE], env=env, capture_output=True,
                          text=True, timeout=300, check=True)
    note, placed = proc.stdout.strip().splitlines()[-2:]
    if user_setting is None:
        assert note.startswith("large blocks kept in the heap") and placed == "False True"
    else:
        assert note == f"malloc left as {user_setting} sets it" and placed == "False False"


@pytest.mark.parametrize("bf16_kernels", [True, False])
def test_amp_on_the_cpu_uses_bf16_only_with_bf16_kernels(tmp_path, cohort_cache, monkeypatch,
                                                         capsys, bf16_kernels):
    """`--amp` on a CPU: bf16 autocast where oneDNN has bf16 kernels; elsewhere (bf16
    convolutions ~10x slower than fp32) the run trains in fp32 and says so once."""
    monkeypatch.setattr(loop, "cpu_has_bf16_kernels", lambda: bf16_kernels)
    trainer = loop.Trainer(_cfg(tmp_path / "run", cohort_cache, amp=True))
    assert trainer.amp_dtype == (torch.bfloat16 if bf16_kernels else None)
    assert not trainer.scaler.is_enabled()
    err = capsys.readouterr().err
    assert err.count("--amp off") == (0 if bf16_kernels else 1), err


def test_fast_step_matches_reference_step():
    """Same weights and batch, no AMP, on the CPU: the custom-op step and the reference step give
    the same losses and gradients (DESIGN §6)."""
    torch.manual_seed(0)
    backbone = UNet3D(down=(8, 16, 16, 16, 32), up=(16, 16, 16, 8))
    fast = GVSL(backbone, ops_backend="cpu")
    ref = GVSL(UNet3D(down=(8, 16, 16, 16, 32), up=(16, 16, 16, 8)), ops_backend="reference")
    ref.load_state_dict(fast.state_dict())
    a, a_t, b = (torch.rand(2, 1, 16, 20, 24) for _ in range(3))
    outs, grads = [], []
    for model in (fast, ref):
        model.zero_grad()
        out = model(a, a_t, b)
        out.loss.backward()
        outs.append(out)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for k in ("loss", "ncc", "smooth", "mse"):
        assert rel_err(getattr(outs[0], k), getattr(outs[1], k)) < 1e-5, k
    for name in grads[0]:
        assert rel_err(grads[0][name], grads[1][name]) < 1e-4, name


def test_resume_is_bit_identical(tmp_path, cohort_cache):
    """N steps + resume + M steps == N + M steps, bit for bit, on the CPU."""
    straight = tmp_path / "straight"
    pretrain(_cfg(straight, cohort_cache, steps=4))
    split = tmp_path / "split"
    pretrain(_cfg(split, cohort_cache, steps=2))
    pretrain(_cfg(split, cohort_cache, steps=4, resume="auto"))
    a = checkpoint.load(straight / "ckpt_00000004.pt")
    b = checkpoint.load(split / "ckpt_00000004.pt")
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert _history(straight) == [
        {**r, "pairs_per_s": s["pairs_per_s"], "seconds": s["seconds"]}
        for r, s in zip(_history(split), _history(straight), strict=True)
    ]


def test_deterministic_run(tmp_path, cohort_cache, monkeypatch):
    """`pretrain --deterministic`: every step runs under torch.use_deterministic_algorithms
    (which the ops and the U-Net follow; nothing the step calls raises there), and the
    setting is restored afterwards."""
    monkeypatch.setenv("GVSL_FAST_CACHE", str(cohort_cache))
    seen = []
    real = loop.Trainer.train_step

    def spy(self, *batch):
        seen.append(torch.are_deterministic_algorithms_enabled())
        return real(self, *batch)

    monkeypatch.setattr(loop.Trainer, "train_step", spy)
    before = torch.are_deterministic_algorithms_enabled()
    out = tmp_path / "run"
    assert main(["pretrain", "--deterministic", "--out", str(out), "--steps", "2", "--patch",
                 "16", "--save-every", "2", "--keep-last", "1", "--no-progress", "--workers",
                 "0", "--loader", "torch"]) == 0
    assert seen == [True, True]
    assert torch.are_deterministic_algorithms_enabled() == before
    assert len(_history(out)) == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16"])
def test_gpu_deterministic_steps_are_bitwise_reproducible(amp):
    """Under pretrain --deterministic's setting, three GVSL steps on the GPU (fast ops,
    channels_last_3d, fused Adam) from the same weights and batches end with the same bits in
    every parameter, twice; nothing the step calls raises."""
    device = torch.device("cuda")
    torch.manual_seed(0)
    start = GVSL(UNet3D(down=(8, 16, 16, 32, 32), up=(32, 16, 16, 8))).state_dict()
    batches = [[torch.rand(2, 1, 32, 32, 32, device=device) for _ in range(3)]
               for _ in range(3)]
    runs = []
    with loop.determinism(True):
        for _ in range(2):
            model = GVSL(UNet3D(down=(8, 16, 16, 32, 32), up=(32, 16, 16, 8)))
            model.load_state_dict(start)
            model = model.to(device, memory_format=torch.channels_last_3d)
            opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
            for a, a_t, b in batches:
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                    out = model(*(x.contiguous(memory_format=torch.channels_last_3d)
                                  for x in (a, a_t, b)))
                out.loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            runs.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    for k, v in runs[0].items():
        assert torch.equal(v, runs[1][k]), k


def test_checkpoint_errors_are_clear(tmp_path, cohort_cache):
    out = tmp_path / "run"
    pretrain(_cfg(out, cohort_cache, steps=2))
    good = checkpoint.list_checkpoints(out)[-1]
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(checkpoint.CheckpointError, match="truncated or corrupt"):
        checkpoint.load(cut)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(checkpoint.CheckpointError, match="not a gvsl-fast checkpoint"):
        checkpoint.load(foreign)
    other = GVSL(UNet3D(down=(8, 16, 16, 16, 32), up=(16, 16, 16, 8)), ops_backend="reference")
    with pytest.raises(checkpoint.CheckpointError, match="another model"):
        checkpoint.check_model_state(good, other, checkpoint.load(good)["model"])
    # a fresh run refuses to overwrite an existing one; resume continues it
    with pytest.raises(RuntimeError, match="already holds checkpoints"):
        pretrain(_cfg(out, cohort_cache, steps=2))


def test_a_single_process_makes_its_gpu_current(monkeypatch):
    """--device cuda:N makes N the current device of a single process (a DDP rank's is set by
    distributed.setup): kernels launch on the current device."""
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    loop.use_device(torch.device("cuda:1"), DistInfo())
    for device, dist in (("cuda", DistInfo()), ("cpu", DistInfo()),
                         ("cuda:1", DistInfo(rank=1, world_size=2, local_rank=1))):
        loop.use_device(torch.device(device), dist)
    assert calls == [torch.device("cuda:1")]


def test_save_is_atomic_when_interrupted(tmp_path, monkeypatch):
    """A save that dies mid-write leaves the previous checkpoint intact and no stray file."""
    path = checkpoint.save({"step": 1, "x": torch.ones(3)}, tmp_path / "ckpt_00000001.pt")
    before = path.read_bytes()

    def boom(obj, f, *a, **kw):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save({"step": 1}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_ctrl_c_during_a_save_waits_for_the_file(tmp_path):
    """SIGINT while a file is written is raised once it is complete and in place, and the file
    gets the mode of any other file the run writes (the umask's, not mkstemp's 0600)."""
    # Python's Ctrl-C handler, also where this test runs in the background (SIGINT ignored)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _ctrl_c_during_a_save(tmp_path)
    finally:
        signal.signal(signal.SIGINT, before)


def _ctrl_c_during_a_save(tmp_path):
    path = tmp_path / "ckpt_00000001.pt"

    def write(f):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C, delivered at once to this main thread
        torch.save({"format": checkpoint.FORMAT, "version": checkpoint.VERSION, "step": 1}, f)

    with pytest.raises(KeyboardInterrupt):
        checkpoint.write_atomic(path, write)
    assert checkpoint.load(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_interrupted_pretrain_says_how_to_resume(tmp_path, monkeypatch, capsys):
    def interrupted(cfg):
        checkpoint.save({"step": 2}, checkpoint.checkpoint_path(cfg.out, 2))
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "pretrain", interrupted)
    out = tmp_path / "run"
    assert main(["pretrain", "--out", str(out), "--device", "cpu"]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"gvsl-fast pretrain: interrupted; the last checkpoint is {out / 'ckpt_00000002.pt'}: "
        "add --resume auto to the same command to continue from it")


def test_an_out_that_is_a_file_is_one_clear_error(tmp_path, cohort_cache, capsys):
    out = tmp_path / "afile"
    out.write_text("mine")
    assert main(["pretrain", "--out", str(out), "--cache", str(cohort_cache), "--steps", "1",
                 "--device", "cpu"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"gvsl-fast pretrain: error: --out {out} is a file; the run needs a folder")
    assert out.read_text() == "mine"
    empty = tmp_path / "empty"  # data that fails: the run's new --out is not left behind
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no images in"):
        pretrain(_cfg(tmp_path / "new" / "run", cohort_cache, data=str(empty)))
    assert not (tmp_path / "new" / "run").exists()


def test_resume_refuses_another_run(tmp_path, cohort_cache, capsys):
    """Resuming under options that define another run, or into an --out whose later checkpoints
    it would prune, is refused before anything is written; --resume auto with no checkpoint and
    a --steps already reached say so."""
    out = tmp_path / "run"
    pretrain(_cfg(out, cohort_cache, steps=4, keep_last=2))
    files = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(ValueError, match=r"--resume \S*ckpt_00000004\.pt: its run used --lr "
                       r"0\.0001, this command gives --lr 0\.5; resume with the run's options"):
        pretrain(_cfg(out, cohort_cache, steps=6, resume="auto", lr=0.5))
    with pytest.raises(ValueError, match="its run used --weights 1.0 1.0 1.0, this command "
                       "gives --weights 1.0 2.0 1.0"):
        pretrain(_cfg(out, cohort_cache, steps=6, resume="auto", weights=(1.0, 2.0, 1.0)))
    with pytest.raises(RuntimeError, match=r"holds checkpoints after step 2 "
                       r"\(ckpt_00000004\.pt\): resuming \S+ there would prune them"):
        pretrain(_cfg(out, cohort_cache, steps=6, resume=str(out / "ckpt_00000002.pt")))
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == files
    capsys.readouterr()
    pretrain(_cfg(out, cohort_cache, steps=4, resume="auto"))
    assert "at step 4; --steps 4 is reached, nothing to train" in capsys.readouterr().err
    fresh = tmp_path / "fresh"
    pretrain(_cfg(fresh, cohort_cache, steps=0, resume="auto"))
    assert f"--resume auto: no checkpoint in {fresh} yet, starting at step 0" in (
        capsys.readouterr().err)


def test_a_failed_save_names_the_file_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    path = checkpoint.save({"step": 1}, tmp_path / "ckpt_00000001.pt")
    before = path.read_bytes()

    def full(obj, f, *a, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(checkpoint.CheckpointError, match=r"could not write \S*ckpt_00000002\.pt "
                       r"\(OSError: \[Errno 28\] No space left on device\)"):
        checkpoint.save({"step": 2}, tmp_path / "ckpt_00000002.pt", keep_last=1)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_export_and_info(tmp_path, cohort_cache, capsys):
    out = tmp_path / "run"
    pretrain(_cfg(out, cohort_cache, steps=2))
    ckpt = checkpoint.list_checkpoints(out)[-1]
    assert main(["export", str(ckpt), str(tmp_path / "backbone.pt")]) == 0
    net = UNet3D.from_pretrained(tmp_path / "backbone.pt")
    state = checkpoint.load(ckpt)["model"]
    assert torch.equal(net.state_dict()["encoder.0.0.weight"], state["backbone.encoder.0.0.weight"])
    # a checkpoint of a compiled run from before the U-Net was compiled in place, its backbone
    # keys behind torch.compile's `_orig_mod.`, exports the same weights
    legacy = checkpoint.load(ckpt)
    legacy["model"] = {k.replace("backbone.", "backbone._orig_mod.", 1): v
                       for k, v in legacy["model"].items()}
    checkpoint.save(legacy, tmp_path / "legacy.pt")
    assert main(["export", str(tmp_path / "legacy.pt"), str(tmp_path / "legacy_backbone.pt")]) == 0
    old = UNet3D.from_pretrained(tmp_path / "legacy_backbone.pt")
    for k, v in net.state_dict().items():
        assert torch.equal(v, old.state_dict()[k]), k
    assert main(["export", str(tmp_path / "nope.pt"), str(tmp_path / "x.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    before = ckpt.read_bytes()
    for target in (ckpt, tmp_path / "legacy.pt"):  # never over a training checkpoint
        assert main(["export", str(ckpt), str(target)]) == 2
        assert capsys.readouterr().err.strip() == (
            f"gvsl-fast export: error: OUT {target} is a training checkpoint; export writes a "
            "new file and never replaces one")
    assert ckpt.read_bytes() == before
    assert main(["export", str(ckpt), str(tmp_path)]) == 2
    assert f"OUT {tmp_path} is a folder" in capsys.readouterr().err
    assert main(["info"]) == 0
    assert "op backends" in capsys.readouterr().out


def _close(x: str, y: str, rtol: float = 1e-4, atol: float = 1e-9) -> bool:
    return abs(float(x) - float(y)) <= atol + rtol * abs(float(y))


@pytest.mark.slow
def test_compile_matches_eager_and_checkpoints_interchange(tmp_path, cohort_cache):
    """`--compile` (inductor on the CPU): the losses of the first steps match the eager run's,
    and its checkpoints hold the plain U-Net's keys: an eager run resumes a compiled run's
    checkpoint and a compiled run an eager one's, and `gvsl-fast export` takes it."""
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    pretrain(_cfg(eager, cohort_cache, steps=2))
    pretrain(_cfg(compiled, cohort_cache, steps=2, compile=True))
    for e, c in zip(_history(eager), _history(compiled), strict=True):
        assert e["step"] == c["step"]
        for k in LOSSES:
            assert _close(c[k], e[k]), (c["step"], k, c[k], e[k])
    ck_eager = checkpoint.load(eager / "ckpt_00000002.pt")
    ck_compiled = checkpoint.load(compiled / "ckpt_00000002.pt")
    assert list(ck_compiled["model"]) == list(ck_eager["model"])  # no `_orig_mod.` keys
    # the two runs' weight updates agree. Adam's first updates are about lr * sign(gradient),
    # so a weight whose gradient is rounding noise (a bias before a normalization) moves by
    # +-lr either way, and how many do depends on the CPU's instruction set; a wrong compiled
    # backward would move most weights differently
    lr = TrainConfig().lr
    weights = [(v, ck_eager["model"][k]) for k, v in ck_compiled["model"].items()
               if v.is_floating_point()]
    assert any(not torch.equal(c, e) for c, e in weights)  # else inductor's code never ran
    apart = sum(int(((c - e).abs() > lr).sum()) for c, e in weights)
    assert apart < 1e-2 * sum(c.numel() for c, _ in weights), apart

    # a checkpoint written before the in-place compile (`backbone._orig_mod.` keys) resumes too
    legacy = tmp_path / "legacy"
    old = {**ck_compiled, "model": {k.replace("backbone.", "backbone._orig_mod.", 1): v
                                    for k, v in ck_compiled["model"].items()}}
    checkpoint.save(old, checkpoint.checkpoint_path(legacy, 2))
    pretrain(_cfg(legacy, cohort_cache, steps=3, resume="auto"))
    # eager continues the compiled run, compiled continues the eager run
    pretrain(_cfg(compiled, cohort_cache, steps=3, resume="auto"))
    pretrain(_cfg(eager, cohort_cache, steps=3, resume="auto", compile=True))
    from_compiled, from_eager = _history(compiled)[-1], _history(eager)[-1]
    assert from_compiled["step"] == from_eager["step"] == "3"
    for k in LOSSES:  # from step-2 weights that differ by those +-lr moves
        assert _close(from_compiled[k], from_eager[k], rtol=1e-3), (k, from_compiled[k],
                                                                    from_eager[k])
    assert [{k: r[k] for k in LOSSES} for r in _history(legacy)] == [
        {k: from_compiled[k] for k in LOSSES}]
    ck_legacy = checkpoint.load(legacy / "ckpt_00000003.pt")["model"]
    step3_compiled = checkpoint.load(compiled / "ckpt_00000003.pt")["model"]
    for k, v in step3_compiled.items():
        assert torch.equal(v, ck_legacy[k]), k

    assert main(["export", str(compiled / "ckpt_00000003.pt"), str(tmp_path / "net.pt")]) == 0
    net = UNet3D.from_pretrained(tmp_path / "net.pt")
    for k, v in net.state_dict().items():
        assert torch.equal(v, step3_compiled[f"backbone.{k}"]), k


def test_tensorboard_events_hold_the_logged_scalars(tmp_path, cohort_cache, capsys):
    """With tensorboard installed, tensorboard/train and tensorboard/eval hold every column of
    history.csv and eval.csv as scalars, at the same steps with the same values."""
    ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    out = tmp_path / "run"
    pretrain(_cfg(out, cohort_cache, steps=2))
    assert "TensorBoard" not in capsys.readouterr().err
    with (out / "eval.csv").open() as f:
        evals = list(csv.DictReader(f))
    for name, rows, columns in (("train", _history(out), TRAIN_COLUMNS[1:]),
                                ("eval", evals, LOSSES)):
        acc = ea.EventAccumulator(str(out / "tensorboard" / name))
        acc.Reload()
        assert sorted(acc.Tags()["scalars"]) == sorted(f"{name}/{k}" for k in columns)
        for k in columns:
            logged = [(e.step, e.value) for e in acc.Scalars(f"{name}/{k}")]
            assert logged == [(int(r["step"]), pytest.approx(float(r[k]), rel=1e-6))
                              for r in rows], k
    assert [int(r["step"]) for r in evals] == [0, 2]


def test_runs_without_tensorboard_and_says_so_once(tmp_path, cohort_cache, monkeypatch, capsys):
    """tensorboard not importable: the run trains and writes its CSVs, no tensorboard folder,
    and one line on stderr says TensorBoard logging is off."""
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    out = tmp_path / "run"
    pretrain(_cfg(out, cohort_cache, steps=2))
    err = capsys.readouterr().err
    assert err.count("TensorBoard logging off") == 1, err
    assert len(_history(out)) == 2
    assert not (out / "tensorboard").exists()


def test_apex_fused_adam_without_apex_is_one_clear_error(tmp_path, monkeypatch, capsys):
    """`--optimizer apex-fused-adam` with apex not importable: exit code 2 and one error line
    naming the option, before any data is prepared."""
    monkeypatch.setitem(sys.modules, "apex", None)
    monkeypatch.setitem(sys.modules, "apex.optimizers", None)
    code = main(["pretrain", "--optimizer", "apex-fused-adam", "--out", str(tmp_path / "run"),
                 "--cache", str(tmp_path / "cache"), "--steps", "1", "--patch", "16",
                 "--batch-size", "1", "--no-progress", "--loader", "torch"])
    assert code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1, err
    assert lines[0].startswith("gvsl-fast pretrain: error: --optimizer apex-fused-adam: apex is "
                               "not importable"), lines[0]
    assert not (tmp_path / "cache").exists()
    assert not checkpoint.list_checkpoints(tmp_path / "run")


@pytest.mark.parametrize(("option", "value", "says"), [
    ("--batch-size", "0", "must be >= 1, got 0"), ("--patch", "-8", "must be >= 1, got -8"),
    ("--lr", "0", "must be > 0, got 0"), ("--spacing", "-2", "must be > 0, got -2"),
    ("--steps", "-1", "must be >= 0, got -1"), ("--keep-last", "0", "must be >= 1, got 0"),
    ("--save-every", "0", "must be >= 1, got 0"), ("--workers", "two", "invalid int value"),
    ("--spacing", "inf", "must be a finite number, got inf"),
    ("--lr", "nan", "must be a finite number, got nan"), ("--seed", "-1", "must be >= 0, got -1"),
    ("--weights", "nan 1 1", "must be a finite number, got nan"),
])
def test_bad_numbers_are_refused_naming_the_option(tmp_path, capsys, option, value, says):
    """Refused by the parser (exit 2, one line naming the option) before anything runs."""
    with pytest.raises(SystemExit) as exc:
        main(["pretrain", option, *value.split(), "--out", str(tmp_path / "run"),
              "--cache", str(tmp_path / "cache")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"gvsl-fast pretrain: error: argument {option}: ") and says in err, err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()



@pytest.mark.parametrize("args,says", [
    (["--patch", "64", "64"], "--patch: give one size or three (D H W), got 2"),
    (["--device", "gpu"], "--device gpu: not a device (auto, cpu, cuda or cuda:N)"),
])
def test_bad_sizes_and_devices_are_refused_naming_the_option(tmp_path, capsys, args, says):
    """Values the parser cannot judge alone: exit 2 and one line naming the option, before any
    data is prepared."""
    code = main(["pretrain", *args, "--out", str(tmp_path / "run"),
                 "--cache", str(tmp_path / "cache")])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"gvsl-fast pretrain: error: {says}"
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()

def test_tensor_bytes_counts_live_storages_and_their_peak():
    """Views and in-place results share a storage (counted once); a freed storage leaves the
    live count; the peak is the most live at once."""
    with host_memory.TensorBytes() as counted:
        a = torch.empty(1 << 20, dtype=torch.uint8)
        b = torch.zeros(2 << 20, dtype=torch.uint8)
        view = b[::2].add_(1)
        assert counted.live == 3 << 20
        del a
        c = torch.empty(3 << 20, dtype=torch.uint8)
        assert counted.live == 5 << 20
    del b, view, c
    assert counted.peak == 5 << 20 and counted.live == 0
    if platform.system() == "Linux":
        assert 0 < host_memory.available_bytes() <= os.sysconf("SC_PAGE_SIZE") * os.sysconf(
            "SC_PHYS_PAGES")


@pytest.mark.parametrize("grad_checkpoint", [False, True])
def test_step_memory_on_fake_tensors_matches_a_real_step(tmp_path, grad_checkpoint):
    """The memory check's dry run (fake tensors, nothing allocated) counts what the real forward
    and backward of the same batch hold at their peak."""
    trainer = loop.Trainer(_cfg(tmp_path / "run", tmp_path / "cache", patch=(32, 32, 32),
                                grad_checkpoint=grad_checkpoint))
    need = trainer.step_memory()
    with host_memory.TensorBytes() as real:
        batch = [torch.empty(1, 1, 32, 32, 32).contiguous(memory_format=torch.channels_last_3d)
                 for _ in range(3)]
        for x in batch:
            x.uniform_()
        out = trainer.model(*batch)
        torch.autograd.grad(out.loss, list(trainer.model.parameters()))
    assert need["step"] == pytest.approx(real.peak, rel=0.01)
    weights = sum(p.numel() * 4 for p in trainer.model.parameters())
    assert need["adam"] == 2 * weights
    assert need["loader"] == 3 * 2 * 32**3 * 4  # workers=0: one batch ahead


def test_a_step_too_big_for_this_machine_is_refused_before_anything_runs(tmp_path, capsys,
                                                                         monkeypatch):
    """--patch 1000 on the CPU (about 9 TiB): one line naming --patch and --batch-size, before
    any data is prepared or the run folder is made, instead of the kernel killing the run."""
    monkeypatch.setattr(host_memory, "available_bytes", lambda: 16 << 30)
    monkeypatch.delenv(loop.NO_MEMORY_CHECK, raising=False)
    code = main(["pretrain", "--patch", "1000", "--device", "cpu", "--out", str(tmp_path / "run"),
                 "--cache", str(tmp_path / "cache"), "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("gvsl-fast pretrain: error: --patch 1000 1000 1000 with --batch-size 2: "
                          "training needs at least 9."), err
    assert err.endswith("TiB of memory, and 16.0 GiB is available. Choose a smaller --patch or "
                        "--batch-size, or add --grad-checkpoint; GVSL_FAST_NO_MEMORY_CHECK=1 "
                        "starts it anyway"), err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()


def test_memory_check_counts_every_local_process_and_can_be_skipped(tmp_path, monkeypatch,
                                                                   capsys):
    """A run that fits says what it needs, once; each of torchrun's local processes counts."""
    trainer = loop.Trainer(_cfg(tmp_path / "run", tmp_path / "cache"))
    need = sum(trainer.step_memory().values())
    monkeypatch.setattr(host_memory, "available_bytes", lambda: 2 * need)
    monkeypatch.delenv(loop.NO_MEMORY_CHECK, raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    capsys.readouterr()
    trainer.check_host_memory()  # 2 x need fits
    assert capsys.readouterr().err == (
        f"gvsl-fast: memory: training needs at least {loop._size(2 * need)} (2 processes on this "
        f"machine); {loop._size(2 * need)} is available\n")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    with pytest.raises(RuntimeError, match=r"\(3 processes on this machine\), and .* available"):
        trainer.check_host_memory()
    monkeypatch.setenv(loop.NO_MEMORY_CHECK, "1")
    trainer.check_host_memory()


@pytest.mark.slow
def test_ddp_two_cpu_processes_keep_identical_replicas(tmp_path):
    """torchrun with 2 gloo processes: after a few steps both replicas hold the same weights."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "tests" / "ddp_worker.py"), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    w0 = torch.load(tmp_path / "rank0.pt")
    w1 = torch.load(tmp_path / "rank1.pt")
    assert w0["step"] == w1["step"] == 3
    assert w0["batch_sum"] != w1["batch_sum"]  # each rank saw its own data
    for k, v in w0["model"].items():
        assert torch.equal(v, w1["model"][k]), k
    assert sorted(p.name for p in (tmp_path / "run").glob("ckpt_*.pt")) == ["ckpt_00000003.pt"]


def test_pretrain_on_a_nifti_folder(tmp_path):
    """`--data DIR` of .nii/.nii.gz: preprocessed into the cache, then trained on."""
    import nibabel as nib
    from nifti_inputs import anatomical

    src = anatomical()
    data = tmp_path / "images"
    data.mkdir()
    img = nib.load(src)
    nib.save(img, data / "subject1.nii")
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[::-1].copy(), img.affine),
             data / "subject2.nii.gz")
    out = tmp_path / "run"
    code = main(["pretrain", "--data", str(data), "--out", str(out), "--cache",
                 str(tmp_path / "cache"), "--steps", "2", "--patch", "16", "--spacing", "2",
                 "--batch-size", "1", "--no-progress", "--loader", "torch"])
    assert code == 0
    assert len(_history(out)) == 2
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["pretrain", "--data", str(empty), "--out", str(tmp_path / "r2"), "--steps", "1",
                 "--cache", str(tmp_path / "cache")]) == 2

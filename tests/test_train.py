"""``python -m vil.train`` on a tiny ViL and a synthetic image folder (CPU, a few seconds each).

The data: three classes of noisy 36x40 images whose colour is the class (learnable in a few
steps). The model: ``vil2-tiny`` shrunk to dim 32, one block pair, patch 8, at 32 px.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import vil
from vil import train as vt
from vil.data import ImageFolder, ShardedSampler, build_transform

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model", "vil2-tiny", "--model-kwargs", "dim=32", "depth=1", "patch_size=8",
        "--img-size", "32", "--workers", "0", "--no-progress", "--warmup-epochs", "0",
        "--threads", "1"]


def _make_folder(root, n_train=16, n_val=4, seed=0):
    from PIL import Image
    rng = np.random.default_rng(seed)
    colors = [(200, 40, 40), (40, 200, 40), (40, 40, 200)]
    for split, n in (("train", n_train), ("val", n_val)):
        for c, col in enumerate(colors):
            d = os.path.join(root, split, f"class{c}")
            os.makedirs(d, exist_ok=True)
            for i in range(n):
                a = np.array(col)[None, None, :] + rng.normal(0, 40, (36, 40, 3))
                Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(
                    os.path.join(d, f"{i:03d}.png"))
    return str(root)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return _make_folder(tmp_path_factory.mktemp("clean"))


@pytest.fixture(scope="module")
def corrupt_data(tmp_path_factory, data):
    root = str(tmp_path_factory.mktemp("corrupt") / "d")
    shutil.copytree(data, root)
    with open(os.path.join(root, "train", "class1", "broken.jpg"), "wb") as f:
        f.write(b"this is not a JPEG")
    with open(os.path.join(root, "val", "class2", "truncated.png"), "wb") as f:
        with open(os.path.join(root, "val", "class2", "000.png"), "rb") as g:
            f.write(g.read()[:60])
    return root


@pytest.fixture(autouse=True)
def _one_thread():
    # Two shared cores: one intra-op thread is ~50x faster than two contended ones here.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _records(out, event=None):
    with open(os.path.join(out, "log.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    return [r for r in recs if event is None or r["event"] == event]


def _ckpt(out, name="checkpoint.pt"):
    return torch.load(os.path.join(out, name), map_location="cpu", weights_only=False)


def _assert_state_equal(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        if atol:
            torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-4, msg=k)
        else:
            assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------------ end to end
def test_single_process_learns_checkpoints_and_skips_corrupt(corrupt_data, tmp_path, capsys):
    out = str(tmp_path / "run")
    vt.main(["--data", corrupt_data, "--out", out, "--epochs", "3", "--batch-size", "8",
             "--lr", "3e-3", "--log-every", "2"] + TINY)
    epochs = _records(out, "epoch")
    assert [e["epoch"] for e in epochs] == [0, 1, 2]
    assert epochs[-1]["train_loss"] < 0.8 * epochs[0]["train_loss"], epochs
    assert epochs[-1]["val_top1"] > 60
    # The unreadable files are skipped and named: stderr and the JSON log.
    err = capsys.readouterr().err
    bad_train = os.path.join(corrupt_data, "train", "class1", "broken.jpg")
    bad_val = os.path.join(corrupt_data, "val", "class2", "truncated.png")
    assert bad_train in err and bad_val in err
    skipped = {r["path"] for r in _records(out, "skipped_image")}
    assert skipped == {bad_train, bad_val}
    assert epochs[0]["skipped_images"] == [bad_train]
    assert epochs[0]["val_images"] == 12                              # the broken one not counted
    # Checkpoint: everything needed to resume; final weights load through vil.load_checkpoint.
    ck = _ckpt(out)
    assert {"model", "optimizer", "scheduler", "scaler", "epoch", "step", "rng"} <= ck.keys()
    assert ck["epoch"] == 3 and ck["step"] == 18 and ck["batch_in_epoch"] == 0
    assert not [f for f in os.listdir(out) if ".tmp" in f]
    model = vil.create_model("vil2-tiny", dim=32, depth=1, patch_size=8, img_size=32,
                             num_classes=3)
    vil.load_checkpoint(model, os.path.join(out, "model_final.pt"))
    _assert_state_equal(model.state_dict(), ck["model"])
    # --eval-only on the final weights gives the last epoch's numbers.
    metrics = vt.main(["--data", corrupt_data, "--out", str(tmp_path / "ev"), "--eval-only",
                       "--checkpoint", os.path.join(out, "model_final.pt"), "--batch-size", "8"]
                      + TINY)
    assert metrics["val_top1"] == pytest.approx(epochs[-1]["val_top1"])


def test_resume_mid_epoch_equals_uninterrupted(data, tmp_path):
    # Augmentation and drop path on: the resumed run must restore data order, per-sample
    # augmentation and the RNG. 6 steps per epoch: stop at 4 (mid-epoch), continue to 9
    # (through the end-of-epoch evaluation and checkpoint).
    common = ["--data", data, "--epochs", "2", "--batch-size", "8", "--drop-path", "0.1",
              "--log-every", "1"] + TINY + ["--warmup-epochs", "0.5"]
    full = str(tmp_path / "full")
    vt.main(common + ["--out", full, "--max-steps", "9"])
    part = str(tmp_path / "part")
    vt.main(common + ["--out", part, "--max-steps", "4"])
    ck = _ckpt(part)
    assert (ck["epoch"], ck["step"], ck["batch_in_epoch"]) == (0, 4, 4)
    # ... with two loader processes: augmentation does not depend on who loads a sample.
    vt.main(common + ["--out", part, "--max-steps", "9", "--resume", "auto", "--workers", "2"])
    a, b = _ckpt(full), _ckpt(part)
    assert (a["epoch"], a["step"], a["batch_in_epoch"]) == (1, 9, 3)
    assert (b["epoch"], b["step"], b["batch_in_epoch"]) == (1, 9, 3)
    _assert_state_equal(a["model"], b["model"])
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        _assert_state_equal(pa, pb)
    assert a["scheduler"] == b["scheduler"]
    la = [r["loss"] for r in _records(full, "train")]
    lb = [r["loss"] for r in _records(part, "train")]
    assert la == lb and len(la) == 9


def test_torchrun_two_ranks_match_single_process(data, tmp_path):
    """DDP (gloo, 2 ranks x batch 4) after one step == one process with batch 8."""
    common = ["--data", data, "--epochs", "1", "--max-steps", "1", "--no-augment"] + TINY
    single = str(tmp_path / "single")
    vt.main(common + ["--out", single, "--batch-size", "8"])
    ddp = str(tmp_path / "ddp")
    _torchrun(common + ["--out", ddp, "--batch-size", "4"])
    a, b = _ckpt(single), _ckpt(ddp)
    assert b["world_size"] == 2 and len(b["rng"]) == 2
    assert a["step"] == b["step"] == 1
    torch.manual_seed(0)                                               # the runs' initialisation
    ref0 = vil.create_model("vil2-tiny", dim=32, depth=1, patch_size=8, img_size=32,
                            num_classes=3)
    _assert_state_equal(a["model"], b["model"], atol=1e-6)
    assert any(not torch.equal(a["model"][k], ref0.state_dict()[k]) for k in a["model"]), \
        "the step changed nothing"
    config = _records(ddp, "config")[0]
    assert config["world_size"] == 2 and config["global_batch"] == 8
    assert len(_records(ddp, "config")) == 1                          # rank 0 logs alone


def _torchrun(args, nproc=2):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(nproc), "-m", "vil.train"] + args
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def test_torchrun_fsdp_resume_matches_single_process(data, tmp_path):
    """FSDP2 (gloo, 2 ranks x 2 micro-batches of 2) with activation checkpointing and gradient
    clipping, stopped after one step and resumed to the end of two epochs (12 steps, evaluation
    after each) == one process, batch 8."""
    common = ["--data", data, "--epochs", "2", "--no-augment", "--clip-grad", "0.5"] + TINY
    single = str(tmp_path / "single")
    vt.main(common + ["--out", single, "--batch-size", "8"])
    fsdp = str(tmp_path / "fsdp")
    fs = common + ["--out", fsdp, "--batch-size", "2", "--accum-steps", "2", "--fsdp",
                   "--grad-checkpointing"]
    _torchrun(fs + ["--max-steps", "1"])
    assert _ckpt(fsdp)["step"] == 1
    _torchrun(fs + ["--resume", "auto"])
    a, b = _ckpt(single), _ckpt(fsdp)
    assert a["step"] == b["step"] == 12 and a["epoch"] == b["epoch"] == 2
    assert all(type(v) is torch.Tensor for v in b["model"].values())   # full, not sharded
    _assert_state_equal(a["model"], b["model"], atol=1e-5)
    ea = [e for e in _records(single, "epoch")]
    eb = [e for e in _records(fsdp, "epoch") if e["complete"]]
    assert len(ea) == len(eb) == 2
    for x, y in zip(ea, eb):
        assert x["val_images"] == y["val_images"] == 12
        assert x["val_top1"] == y["val_top1"]
        assert x["val_loss"] == pytest.approx(y["val_loss"], rel=1e-4)
    final = torch.load(os.path.join(fsdp, "model_final.pt"), weights_only=True)["model"]
    _assert_state_equal(final, b["model"])


def test_gradient_accumulation_equals_larger_batch(data, tmp_path):
    common = ["--data", data, "--epochs", "1", "--max-steps", "2", "--no-augment"] + TINY
    vt.main(common + ["--out", str(tmp_path / "big"), "--batch-size", "8"])
    vt.main(common + ["--out", str(tmp_path / "acc"), "--batch-size", "4", "--accum-steps", "2"])
    a, b = _ckpt(str(tmp_path / "big")), _ckpt(str(tmp_path / "acc"))
    assert a["step"] == b["step"] == 2 and b["batch_in_epoch"] == 4
    _assert_state_equal(a["model"], b["model"], atol=1e-6)


def test_compile_flag_trains_like_eager(data, tmp_path):
    """--compile (aot_eager here: AOTAutograd's traced forward and backward, quick to build on
    a CPU) trains the same model as eager mode: same losses, same weights after two steps, the
    checkpoint's names unprefixed; --compile-mode alone is refused."""
    common = ["--data", data, "--epochs", "1", "--max-steps", "2", "--no-augment",
              "--batch-size", "8", "--log-every", "1"] + TINY
    vt.main(common + ["--out", str(tmp_path / "eager")])
    vt.main(common + ["--out", str(tmp_path / "compiled"), "--compile", "aot_eager"])
    a, b = _ckpt(str(tmp_path / "eager")), _ckpt(str(tmp_path / "compiled"))
    assert a["model"].keys() == b["model"].keys()
    _assert_state_equal(a["model"], b["model"], atol=1e-5)
    la = [r["loss"] for r in _records(str(tmp_path / "eager"), "train")]
    lb = [r["loss"] for r in _records(str(tmp_path / "compiled"), "train")]
    assert len(la) == len(lb) == 2 and np.allclose(la, lb, rtol=1e-5)
    with pytest.raises(SystemExit, match="--compile-mode needs --compile"):
        vt.parse_args(["--data", data, "--compile-mode", "reduce-overhead"])


def test_bad_arguments_fail_before_the_run_folder_is_made(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match="no train/ folder"):
        vt.main(["--data", str(tmp_path / "nowhere"), "--out", str(out)])
    with pytest.raises(SystemExit, match="--epochs and --lr must be >= 0"):
        vt.main(["--data", str(tmp_path), "--out", str(out), "--lr", "-1"])
    assert not out.exists()


def test_a_data_folder_without_classes_or_images_is_named(tmp_path):
    """A train/ folder with no class folders, or class folders with no images, ends the run with
    one line that names the folder and the layout, not a traceback."""
    (tmp_path / "train").mkdir()
    with pytest.raises(SystemExit, match=r"--data .*: .*(no class folders|find any class folder)"):
        vt.main(["--data", str(tmp_path), "--out", str(tmp_path / "run")])
    (tmp_path / "train" / "cat").mkdir()
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    with pytest.raises(SystemExit, match=r"--data .*: .*(no images|Found no valid file)"):
        vt.main(["--data", str(tmp_path), "--out", str(tmp_path / "run")])


def test_signals_checkpoint_and_stop(data, tmp_path):
    """SIGUSR1 writes a checkpoint and training goes on; SIGTERM writes one and stops cleanly."""
    import signal
    import time
    out = str(tmp_path / "sig")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "vil.train", "--data", data, "--out", out,
                             "--epochs", "1000", "--batch-size", "8", "--log-every", "1"] + TINY,
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        def wait_for(pred, timeout=60):
            t0 = time.time()
            while time.time() - t0 < timeout:
                if os.path.exists(os.path.join(out, "log.jsonl")) and pred(_records(out)):
                    return
                time.sleep(0.1)
            raise AssertionError(f"timed out; log: {_records(out)[-3:]}")

        wait_for(lambda r: any(x["event"] == "train" for x in r))
        proc.send_signal(signal.SIGUSR1)
        wait_for(lambda r: any(x["event"] == "checkpoint" for x in r))
        n = max(x["step"] for x in _records(out, "checkpoint"))
        wait_for(lambda r: max([x["step"] for x in r if x["event"] == "train"]) > n + 1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-2000:]
    end = _records(out, "end")[-1]
    assert end["stopped"] and _ckpt(out)["step"] == end["step"] > n


def test_finetune_from_smaller_resolution(data, tmp_path):
    """A 32 px state_dict into a 64 px model (the 224 -> 448 mechanism): the position
    embedding is interpolated, training starts."""
    torch.manual_seed(1)
    small = vil.create_model("vil2-tiny", dim=32, depth=1, patch_size=8, img_size=32,
                             num_classes=10)                           # another class count
    sd_path = str(tmp_path / "small.pt")
    torch.save(small.state_dict(), sd_path)
    out = str(tmp_path / "ft")
    args = [a if a != "32" else "64" for a in TINY]                    # --img-size 64
    vt.main(["--data", data, "--out", out, "--epochs", "1", "--max-steps", "2",
             "--batch-size", "8", "--lr", "0", "--warmup-lr", "0", "--min-lr", "0",
             "--checkpoint", sd_path] + args)
    load = _records(out, "load_checkpoint")[0]
    assert load["pos_embed_grid"] == [8, 8] and not load["missing"]
    assert any("head" in w for w in load["warnings"])                # fresh 3-class head
    ck = _ckpt(out)
    assert ck["step"] == 2
    pos = ck["model"]["pos_embed.embed"]
    assert pos.shape == (1, 8, 8, 32)
    from vil.layers import interpolate_pos_embed
    torch.testing.assert_close(pos, interpolate_pos_embed(small.pos_embed.embed.detach(), (8, 8)))
    assert ck["model"]["head.weight"].shape == (3, 64)
    torch.testing.assert_close(ck["model"]["blocks.0.rowwise_from_bot_right.layer.proj_up.weight"],
                               small.blocks[0].rowwise_from_bot_right.layer.proj_up.weight.detach())
    assert np.isfinite(_records(out, "epoch")[0]["train_loss"])


# ------------------------------------------------------------------------------------ parts
def test_help_reads_well(capsys):
    with pytest.raises(SystemExit) as e:
        vt.build_parser().parse_args(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--data", "--model", "--img-size", "--checkpoint", "--resume", "--fsdp",
                 "--accum-steps", "--layer-decay", "--drop-path", "--grad-checkpointing",
                 "--label-smoothing", "--mlstm-backend", "--recompute-states", "--max-steps",
                 "torchrun"):
        assert flag in text, flag


def test_sampler_single_process_sees_union_of_ranks():
    single = ShardedSampler(48, 1, 0, shuffle=True, seed=3)
    ranks = [ShardedSampler(48, 2, r, shuffle=True, seed=3) for r in range(2)]
    s, r0, r1 = (list(x) for x in (single, *ranks))
    for i in range(6):                                                 # batch 8 vs 2 x 4
        assert sorted(s[8 * i:8 * i + 8]) == sorted(r0[4 * i:4 * i + 4] + r1[4 * i:4 * i + 4])
    ranks[0].set_start(8)
    assert list(ranks[0]) == r0[8:]
    ev = [list(ShardedSampler(5, 2, r, shuffle=False, pad="blank")) for r in range(2)]
    assert ev == [[0, 2, 4], [1, 3, -1]]


def test_augmentation_is_per_sample_deterministic(data):
    ds = ImageFolder(os.path.join(data, "train"), build_transform(True, 32), seed=0)
    a, b = ds[5][0], ds[5][0]
    assert torch.equal(a, b) and a.shape == (3, 32, 32)
    ds.set_epoch(1)
    assert not torch.equal(a, ds[5][0])
    ev = ImageFolder(os.path.join(data, "val"), build_transform(False, 32))
    assert ev.classes == ["class0", "class1", "class2"] and ev[0][0].shape == (3, 32, 32)


def test_param_groups_lr_schedule_and_loss():
    model = vil.create_model("vil2-tiny", dim=32, depth=3, patch_size=8, img_size=32,
                             num_classes=3)
    groups = vt.build_param_groups(model, 0.05, layer_decay=0.5, lr=1.0)
    by_param = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert len(by_param) == len(named)
    g = lambda n: by_param[id(named[n])]
    assert g("head.weight")["lr"] == 1.0 and g("head.weight")["weight_decay"] == 0.05
    assert g("blocks.2.rowwise_from_top_left.layer.proj_up.weight")["lr"] == 0.5
    assert g("blocks.0.rowwise_from_top_left.layer.proj_up.weight")["lr"] == 0.125
    assert g("patch_embed.proj.weight")["lr"] == 0.0625
    assert g("pos_embed.embed")["weight_decay"] == 0.0
    assert g("blocks.0.rowwise_from_top_left.layer.proj_up.bias")["weight_decay"] == 0.0
    f = lambda s: vt.lr_factor(s, total_steps=110, warmup_steps=10, lr=1e-3, warmup_lr=1e-5,
                               min_lr=1e-5)
    assert f(0) == pytest.approx(0.01) and f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.505) and f(110) == pytest.approx(0.01)
    logits, y = torch.randn(4, 3), torch.tensor([0, 2, -1, 1])
    ref = torch.nn.functional.cross_entropy(logits[[0, 1, 3]], y[[0, 1, 3]], label_smoothing=0.1)
    torch.testing.assert_close(vt.loss_fn(logits, y, 0.1), ref)


def test_activation_checkpointing_same_gradients():
    torch.manual_seed(0)
    a = vil.create_model("vil2-tiny", dim=32, depth=2, patch_size=8, img_size=32, num_classes=3,
                         drop_path_rate=0.2)
    b = vil.create_model("vil2-tiny", dim=32, depth=2, patch_size=8, img_size=32, num_classes=3,
                         drop_path_rate=0.2)
    b.load_state_dict(a.state_dict())
    assert vt.apply_activation_checkpointing(b) == 4
    assert b.state_dict().keys() == a.state_dict().keys()
    x = torch.randn(4, 3, 32, 32)
    for m in (a, b):
        torch.manual_seed(5)
        m(x).square().sum().backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, msg=n)


def test_recompute_states_flag_reaches_the_cells():
    """--recompute-states builds every cell with mlstm_recompute_states=True (default off)."""
    from vil.model import ViLLayer
    for extra, want in (([], False), (["--recompute-states"], True)):
        args = vt.parse_args(["--data", "unused"] + TINY + extra)
        m = vt.build_model(args, num_classes=3)
        layers = [x for x in m.modules() if isinstance(x, ViLLayer)]
        assert layers and all(x.mlstm_recompute_states is want for x in layers)

"""Teachers: every `init:` of a shipped topology has a teacher-training YAML at RepDistiller's recipe, and
published RepDistiller/mdistiller checkpoints load through `init:` with the logits of the net they hold."""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from online_kd.data import dataset_info
from online_kd.engine.runtime import Peer
from online_kd.errors import TopologyError
from online_kd.models import build_model
from online_kd.topology import load_topology

ROOT = Path(__file__).resolve().parents[1]
TOPOLOGIES = ROOT / "topologies"
TEACHERS = sorted(TOPOLOGIES.glob("cifar*/teachers/*.yaml"))
USERS = sorted(p for p in TOPOLOGIES.glob("cifar*/*.yaml") if "init:" in p.read_text())


def raw(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


@pytest.mark.parametrize("path", USERS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_init_has_a_teacher_yaml(path):
    """Each init checkpoint names a teacher YAML of its dataset that trains the same model and says where it goes."""
    topo = raw(path)
    dataset = topo["data"]["dataset"]
    for name, peer in topo["peers"].items():
        if "init" not in peer:
            continue
        makers = [t for t in TEACHERS if raw(t)["data"]["dataset"] == dataset
                  and raw(t)["peers"]["teacher"]["model"] == peer["model"] and f"init: {peer['init']}" in t.read_text()]
        assert len(makers) == 1, (path.name, name, peer["model"], peer["init"])


@pytest.mark.parametrize("path", TEACHERS, ids=lambda p: f"{p.parent.parent.name}/{p.stem}")
def test_teacher_yamls_follow_repdistillers_recipe(path):
    """train_teacher.py: SGD lr 0.05 momentum 0.9 wd 5e-4, batch 64, 240 epochs, ×0.1 after 150/180/210."""
    c = load_topology(path).config
    (peer,) = c.peers.values()
    assert c.data.batch_size == 64 and c.train.epochs == 240 and not peer.frozen and peer.init is None
    opt, sched = peer.optimizer, peer.schedule
    assert (opt.name, opt.lr, opt.momentum, opt.weight_decay) == ("sgd", 0.05, 0.9, 5e-4)
    assert (sched.name, list(sched.milestones), sched.gamma) == ("multistep", [150, 180, 210], 0.1)


def repdistiller_resnet_keys(n: int) -> list[str]:
    """State-dict keys of RepDistiller's models/resnet.py ResNet (BasicBlock, n blocks per stage), as its code names them."""
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    keys = ["conv1.weight", *(f"bn1.{b}" for b in bn)]
    for layer in (1, 2, 3):
        for i in range(n):
            p = f"layer{layer}.{i}"
            keys += [f"{p}.conv1.weight", *(f"{p}.bn1.{b}" for b in bn), f"{p}.conv2.weight", *(f"{p}.bn2.{b}" for b in bn)]
            if i == 0:  # the x4 widths (32 stem, 64 stage1) make every stage's first block project
                keys += [f"{p}.downsample.0.weight", *(f"{p}.downsample.1.{b}" for b in bn)]
    return keys + ["fc.weight", "fc.bias"]


def repdistiller_wrn_keys(n: int, widen: int) -> list[str]:
    """State-dict keys of RepDistiller's models/wrn.py WideResNet (depth 6n+4), as its code names them."""
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    keys, channels = ["conv1.weight"], [16, 16 * widen, 32 * widen, 64 * widen]
    for block in (1, 2, 3):
        for i in range(n):
            p = f"block{block}.layer.{i}"
            keys += [*(f"{p}.bn1.{b}" for b in bn), f"{p}.conv1.weight", *(f"{p}.bn2.{b}" for b in bn), f"{p}.conv2.weight"]
            if i == 0 and channels[block - 1] != channels[block]:
                keys.append(f"{p}.convShortcut.weight")
    return keys + [*(f"bn1.{b}" for b in bn), "fc.weight", "fc.bias"]


def published_file(net: torch.nn.Module, path: Path, prefix: str = "") -> Path:
    """A RepDistiller train_teacher.py checkpoint of ``net``: {'epoch', 'model', 'accuracy', 'optimizer'}."""
    sd = net.state_dict()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    net(torch.randn(2, *next(net.parameters()).shape[1:2], 8, 8)).sum().backward()
    opt.step()  # momentum buffers in the optimizer state, as a real checkpoint has
    torch.save({"epoch": 240, "model": {prefix + k: v for k, v in sd.items()}, "accuracy": torch.tensor(79.42),
                "optimizer": opt.state_dict()}, path)
    return path


def teacher_topology(init: Path, model: str = "resnet8x4"):
    topo = raw(TOPOLOGIES / "quick" / "kd.yaml")
    topo["peers"]["teacher"] = {"model": model, "frozen": True, "init": str(init)}
    topo.pop("stages", None)
    return load_topology(topo)


@pytest.mark.parametrize("model, layout", [("resnet8x4", "repdistiller"), ("resnet8x4", "mdistiller"),
                                           ("resnet8x4", "data_parallel"), ("wrn_16_2", "repdistiller")])
def test_published_checkpoint_loads_through_init_with_identical_logits(tmp_path, model, layout):
    """RepDistiller's resnet8x4 (widths 32/64/128/256, so layer1 projects too) and wrn_16_2 keys are the
    zoo's; its ckpt_epoch_240.pth (mdistiller: the same file under download_ckpts/cifar_teachers/) loads
    strictly through `init:` and gives the same logits."""
    torch.manual_seed(1)
    net = build_model(model, 1, 10)
    with torch.no_grad():  # trained-looking BN statistics, so that eval-mode logits depend on them
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0), m.num_batches_tracked.fill_(7)
    expected = repdistiller_resnet_keys(1) if model == "resnet8x4" else repdistiller_wrn_keys(2, 2)
    assert sorted(net.state_dict()) == sorted(expected)
    where = {"repdistiller": f"{model}_vanilla", "mdistiller": f"download_ckpts/cifar_teachers/{model}_vanilla",
             "data_parallel": "dp"}[layout]
    (tmp_path / where).mkdir(parents=True)
    path = published_file(net, tmp_path / where / "ckpt_epoch_240.pth", "module." if layout == "data_parallel" else "")
    topo = teacher_topology(path, model)
    peer = Peer("teacher", topo, dataset_info(topo.config.data), torch.device("cpu"))
    x = torch.randn(4, 1, 8, 8)
    net.eval(), peer.net.eval()
    with torch.no_grad():
        assert torch.equal(peer.net(x), net(x))


def test_bad_init_files_are_one_line_errors(tmp_path):
    net = build_model("resnet8x4", 1, 10)
    last = tmp_path / "resnet8x4_last.pth"  # RepDistiller's last file also pickles its argparse options
    torch.save({"opt": argparse.Namespace(model="resnet8x4"), "model": net.state_dict()}, last)
    with pytest.raises(TopologyError, match=r"^peers\.teacher\.init: .* holds Python objects beyond tensors.*"
                                            r"ckpt_epoch_N\.pth"):
        topo = teacher_topology(last)
        Peer("teacher", topo, dataset_info(topo.config.data), torch.device("cpu"))
    other = published_file(build_model("resnet8", 1, 10), tmp_path / "ckpt_epoch_240.pth")
    topo = teacher_topology(other)
    with pytest.raises(TopologyError, match=r"^peers\.teacher\.init: .* does not fit CifarResNet: size mismatch"):
        Peer("teacher", topo, dataset_info(topo.config.data), torch.device("cpu"))
    wrong = teacher_topology(other, model="vgg8")
    with pytest.raises(TopologyError, match=r"does not fit VGG: missing block0\.0\.weight, .* unexpected conv1\.weight"):
        Peer("teacher", wrong, dataset_info(wrong.config.data), torch.device("cpu"))
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(wrong.raw))
    r = subprocess.run([sys.executable, "-m", "online_kd.cli", "run", str(tmp_path / "bad.yaml"), "--no-tracking",
                        "--quiet", "--out", str(tmp_path / "run"), "--set", "train.epochs=1"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("error: peers.teacher.init: "), r.stderr


@pytest.mark.parametrize("path, model", [("cifar100/cskd.yaml", "preact_resnet18"), ("cifar10/bss.yaml", "resnet8_zeropad"),
                                         ("cifar10/active_mixup.yaml", "vgg16_5pool")])
def test_reference_networks_in_their_topologies(path, model):
    peers = raw(TOPOLOGIES / path)["peers"]
    assert model in {p.get("model") for p in peers.values()}

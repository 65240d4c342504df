"""The function every Ray Train worker runs: its peers, their shard of each batch, the exchange."""
from __future__ import annotations

import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ..topology import load_topology
from . import checkpoint as ckpt
from . import zero
from .exchange import Exchange, exchange_dtype, placement
from .local import seed_everything, stage_at
from .step import Runtime, topk_correct


def _groups(workers, replicas):
    """Exchange groups (one per replica index) and replica groups (one per peer group); every rank creates all."""
    exchange = {r: dist.new_group([w.rank for w in workers if w.replica == r]) for r in range(replicas)}
    by_peers: dict[tuple, list[int]] = {}
    for w in workers:
        by_peers.setdefault(w.peers, []).append(w.rank)
    replica = {g: dist.new_group(ranks) for g, ranks in by_peers.items()}
    return exchange, replica


def _grad_sync(group, shard_size):
    """Average a peer's replicas' gradients (net and edge modules), weighted by shard size, in one all_reduce.

    Shards of the last batch can differ by one sample; weighting makes the result the
    gradient of the whole batch's mean loss, as one replica would compute it.
    """
    def sync(peers):
        grads = [p.grad for peer in peers for p in peer.parameters() if p.grad is not None]
        if not grads:
            return
        n = float(shard_size())
        flat = torch.cat([g.reshape(-1) * n for g in grads] + [grads[0].new_tensor([n])])
        dist.all_reduce(flat, group=group)
        flat /= flat[-1].clone()
        offset = 0
        for g in grads:
            g.copy_(flat[offset: offset + g.numel()].view_as(g))
            offset += g.numel()
    return sync


def quiet_ray_train_logs() -> None:
    """Ray Train logs every report at INFO (from loggers named by file path); keep warnings only."""
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("ray.train") or "/ray/train/" in name:
            logging.getLogger(name).setLevel(logging.WARNING)


def train_worker(config: dict) -> None:
    """Ray Train entry point: run this rank's share of the topology, report once per epoch."""
    import ray.train
    from ray.train import Checkpoint

    from ..data import BatchStream, build_data

    quiet_ray_train_logs()
    topo = load_topology(config["raw"], check=False)
    c = topo.config
    out = Path(config["out_dir"])
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    workers = placement(topo)
    me = workers[rank]
    replicas = max(p.replicas for p in c.peers.values())
    torch.set_num_threads(config["threads"])
    use_gpu = config["use_gpu"]
    device = ray.train.torch.get_device() if use_gpu else torch.device("cpu")
    exchange_groups, replica_groups = _groups(workers, replicas)
    (out / "pids").mkdir(parents=True, exist_ok=True)
    (out / "pids" / f"rank{rank}.pid").write_text(str(os.getpid()))

    seed_everything(c.train.seed)
    data = build_data(c.data, c.train.seed)
    rt = Runtime(topo, data.info, device, owned=me.peers, train_targets=data.train.targets)
    rt.set_views(data.train, data.train_transform)
    bs = c.data.batch_size
    train = BatchStream(data.train, bs, c.train.seed, transform=data.train_transform, num_shards=replicas, shard=me.replica,
                        sampler=data.train_sampler, loader=data.loader.on(device))
    test = BatchStream(data.test, c.data.test_batch_size or bs, c.train.seed, shuffle=False, loader=data.loader.on(device))
    holdout = BatchStream(data.holdout, c.data.test_batch_size or bs, c.train.seed, shuffle=False) \
        if data.holdout is not None else None
    exchange = Exchange(topo, rt.plan, workers, me, exchange_groups[me.replica], device, exchange_dtype(c.train.precision))
    replica_group = replica_groups[me.peers]
    shard = {"size": 0}
    if replicas > 1:
        rt.grad_sync = _grad_sync(replica_group, lambda: shard["size"])
    own_groups = [dist.new_group([r]) for r in range(dist.get_world_size())]  # every rank creates every group
    for name, peer in rt.peers.items():
        if peer.cfg.deepspeed is not None and peer.optimizer is not None:
            peer.ds = zero.wrap(peer, zero.read_config(name, peer.cfg.deepspeed.config), bs // replicas,
                                replica_group, own_groups[rank])
    if config.get("record_steps"):
        (out / "steps").mkdir(exist_ok=True)
        rt.step_log = open(out / "steps" / f"rank{rank}.jsonl", "a")
    profile = config.get("profile")
    timings = {"compute": [], "wait": [], "exchange": []}

    start_epoch = 0
    restored = ray.train.get_checkpoint()
    if restored:
        with restored.as_directory() as d:
            for name, peer in rt.peers.items():
                peer.load_state(ckpt.load(Path(d) / ckpt.peer_file(name), map_location=device))
                if peer.ds is not None:
                    parts = [_load_zero_state(Path(d) / _zero_file(name, r)) for r in range(replicas)]
                    peer.ds.optimizer.load_state_dict(parts, load_optimizer_states=True, load_from_fp32_weights=True)
            state = ckpt.load(Path(d) / ckpt.ENGINE_FILE)
        for name, sd in state["combiners"].items():
            rt.combiners[name].load_state_dict(sd)
        rt.global_step, start_epoch = state["global_step"], state["epoch"]

    total = topo.total_epochs
    steps_per_epoch = min(len(train), c.train.max_steps_per_epoch or len(train))
    stop_after = config.get("stop_after_epochs")
    for done, epoch in enumerate(range(start_epoch, total)):
        if stop_after and done >= stop_after:
            break
        stage_idx, in_stage = stage_at(topo, epoch)
        stage = topo.stages[stage_idx]
        if rt.stage is not stage:
            rt.enter_stage(stage)
            exchange.enter_stage(stage)
        sums: dict[str, dict[str, torch.Tensor]] = {}
        correct: dict[str, torch.Tensor] = {}
        seen = 0
        t_epoch = time.perf_counter()
        for i, batch in enumerate(train.epoch(epoch)):
            if i >= steps_per_epoch:
                break
            batch = batch.to(device, non_blocking=True)  # with its sampler's extra samples (data.sampler)
            y = batch.y
            shard["size"] = len(y)
            xs = rt.model_inputs(batch, epoch)  # this shard, expanded by data.expand as in the local engine
            res = None
            for phase in rt.phases:  # AFD-style losses update again after the main step
                t0 = time.perf_counter()
                outs = rt.forward(xs, [p for p in rt.peers if p in rt.in_use])
                t1 = time.perf_counter()
                if profile:
                    dist.barrier(group=exchange.group)
                t2 = time.perf_counter()
                outs.update(exchange(outs, rt.expansion.rows(len(y))))
                t3 = time.perf_counter()
                outs.update(rt.derived(outs, y))
                res = rt.finish_step(outs, batch, epoch, in_stage, phase=phase, result=res)
                t4 = time.perf_counter()
                if profile:
                    timings["compute"].append((t1 - t0) + (t4 - t3))
                    timings["wait"].append(t2 - t1)
                    timings["exchange"].append(t3 - t2)
            _refit(rt, holdout, me)
            seen += res.count
            for peer, terms in res.terms.items():
                acc = sums.setdefault(peer, {})
                for k, v in terms.items():
                    acc[k] = acc.get(k, 0.0) + v * res.count
                correct[peer] = correct.get(peer, 0) + res.correct[peer]
        rt.end_epoch()
        train_metrics = _reduce_train(rt, sums, correct, seen, replica_group, replicas)
        if replicas > 1:
            for peer in rt.peers.values():
                for buf in peer.buffers():
                    dist.broadcast(buf, src=dist.get_process_group_ranks(replica_group)[0], group=replica_group)
        last = epoch == total - 1
        evals = _evaluate(rt, test, me) if (epoch + 1) % c.train.eval_every == 0 or last else {}
        metrics = {"epoch": epoch, "stage": stage.name, "seconds": time.perf_counter() - t_epoch, "rank": rank,
                   "train": train_metrics if me.replica == 0 else {}, "eval": evals}
        with tempfile.TemporaryDirectory() as d:
            for name, peer in rt.peers.items():
                if me.replica == 0:
                    torch.save(peer.state(), Path(d) / ckpt.peer_file(name))
                if peer.ds is not None:  # each replica holds its own ZeRO partition of the optimizer
                    torch.save(_zero_state(peer), Path(d) / _zero_file(name, me.replica))
            if rank == 0:
                torch.save({"epoch": epoch + 1, "global_step": rt.global_step,
                            "combiners": {n: m.state_dict() for n, m in rt.combiners.items()}},
                           Path(d) / ckpt.ENGINE_FILE)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d) if any(Path(d).iterdir()) else None)
    if profile:
        _write_profile(out, rank, me, timings, exchange, steps_per_epoch)


def _zero_file(peer: str, replica: int) -> str:
    return f"peer_{peer}.zero{replica}.pt"


def _zero_state(peer) -> dict:
    """A replica's ZeRO optimizer partition, with tensors and plain values only (loadable weights_only)."""
    sd = dict(peer.ds.optimizer.state_dict())
    sd.pop("loss_scaler", None)  # a DeepSpeed object; fp32 training keeps the static scale of 1
    return sd


def _load_zero_state(path: Path) -> dict:
    """weights_only load of a ZeRO partition, allowing DeepSpeed's own plain types (enums, fragment records)."""
    import importlib

    allowed = []
    for qual in torch.serialization.get_unsafe_globals_in_checkpoint(path):
        if not qual.startswith("deepspeed."):
            raise RuntimeError(f"{path}: unexpected type {qual} in a ZeRO checkpoint")
        module, _, attr = qual.rpartition(".")
        allowed.append(getattr(importlib.import_module(module), attr))
    with torch.serialization.safe_globals(allowed):
        return ckpt.load(path)


def _refit(rt: Runtime, holdout, me) -> None:
    """KDCL-Linear refits: replica-0 workers share their members' held-out logits; all refit alike."""
    due = [n for n, comb in rt.combiners.items()
           if comb.refit_every and rt.global_step % comb.refit_every == 0 and rt.global_step > 0]
    if not due or holdout is None:
        return
    members = {m for n in due for m in rt.topology.config.ensembles[n].members}
    mine = [m for m in members if m in rt.peers] if me.replica == 0 else []
    logits, y = rt.logits_over(holdout, mine) if mine else ({}, None)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, ({k: v.cpu() for k, v in logits.items()}, None if y is None else y.cpu()))
    everything, labels = {}, None
    for part, ys in gathered:
        everything.update(part)
        labels = ys if ys is not None else labels
    for n in due:
        rt.combiners[n].refit([everything[m].to(rt.device) for m in rt.topology.config.ensembles[n].members],
                              labels.to(rt.device))


def _reduce_train(rt, sums, correct, seen, group, replicas) -> dict:
    """Per-peer epoch means of the loss terms and train accuracy, over the peer's replicas."""
    out = {}
    for peer in sorted(sums):
        keys = sorted(sums[peer])
        vec = torch.stack([torch.as_tensor(sums[peer][k], dtype=torch.float64) for k in keys]
                          + [torch.as_tensor(correct[peer], dtype=torch.float64), torch.tensor(float(seen), dtype=torch.float64)])
        if replicas > 1:
            dist.all_reduce(vec, group=group)
        n = float(vec[-1])
        out[peer] = {**{k: float(vec[i]) / n for i, k in enumerate(keys)}, "train_top1": 100.0 * float(vec[-2]) / n,
                     "lr": rt.peers[peer].optimizer.param_groups[0]["lr"]}
    return out


def _evaluate(rt: Runtime, test, me) -> dict:
    """Replica-0 workers' eval logits gathered to rank 0, which scores every peer and ensemble."""
    names = [p for p, peer in rt.peers.items() if me.replica == 0 and (peer.trained_epochs > 0 or peer.cfg.init)]
    logits, y = rt.logits_over(test, names) if names else ({}, None)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, ({k: v.cpu() for k, v in logits.items()}, None if y is None else y.cpu()))
    if dist.get_rank() != 0:
        return {}
    everything, labels = {}, None
    for part, ys in gathered:
        everything.update(part)
        labels = ys if ys is not None else labels
    if labels is None:
        return {}
    everything.update({k: v.cpu() for k, v in rt.ensemble_logits({k: v.to(rt.device) for k, v in everything.items()}).items()})
    out = {}
    for node, z in everything.items():
        hits = topk_correct(z, labels)
        out[node] = {"top1": 100.0 * hits[1] / len(labels), "top5": 100.0 * hits[5] / len(labels)}
    return out


def _write_profile(out: Path, rank: int, me, timings: dict, exchange: Exchange, steps: int) -> None:
    med = {k: 1e3 * statistics.median(v[3:] or v) for k, v in timings.items() if v}
    n = sum(len(v) for v in timings.values()) // 3 or 1
    (out / "profile").mkdir(exist_ok=True)
    (out / "profile" / f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "peers": list(me.peers), "replica": me.replica,
        "compute_ms": med.get("compute"), "wait_ms": med.get("wait"), "exchange_ms": med.get("exchange"),
        "bytes_per_step": exchange.bytes_sent / n, "mode": "all_gather" if exchange.dense else "p2p", "steps": n,
    }))

"""Every kind of topology mistake gives one 'place: message' line naming its YAML place and what is allowed."""
from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from online_kd.errors import TopologyError
from online_kd.losses import LOSSES, EdgeLoss, Needs, Params, register_loss
from online_kd.topology import load_topology, parse_override
from online_kd.topology.plan import build_plan

ROOT = Path(__file__).resolve().parents[1]
QUICK = ROOT / "topologies" / "quick"


# ---------------------------------------------------------------------- a test-only feature loss
class FeatureParams(Params):
    tap: str = "pool"
    target_tap: str | None = None


if "test_feature_mse" not in LOSSES:
    @register_loss("test_feature_mse")
    class FeatureMSE(EdgeLoss):
        """Test-only: MSE between a named tap of source and target; the shapes must be equal."""

        Params = FeatureParams
        source_kinds = frozenset({"peer"})

        def needs(self) -> Needs:
            p = self.params
            return Needs(source=("logits", p.tap), target=("logits", p.target_tap or p.tap))

        def build(self, source_shapes, target_shapes):
            super().build(source_shapes, target_shapes)
            p = self.params
            s, t = source_shapes[p.tap], target_shapes[p.target_tap or p.tap]
            if s != t:
                raise ValueError(f"tap shapes differ: source {list(s)}, target {list(t)}")

        def forward(self, source, target, batch):
            p = self.params
            return (source[p.tap] - target[p.target_tap or p.tap]).pow(2).mean()


# ---------------------------------------------------------------------- helpers
def base(**top) -> dict:
    """Two digits peers, a teacher and a student, one KD edge, no stages."""
    raw = {
        "name": "t",
        "data": {"dataset": "digits", "batch_size": 8},
        "train": {"epochs": 2},
        "peers": {"teacher": {"model": "convnet"}, "student": {"model": "convnet_small"}},
        "edges": [{"from": "teacher", "to": "student", "loss": "kd", "temperature": 4}],
    }
    raw.update(top)
    return raw


def quick(name: str) -> dict:
    return yaml.safe_load((QUICK / f"{name}.yaml").read_text())


def error(source, overrides=(), plan=False) -> str:
    """The message a broken topology fails with (asserting it is one line)."""
    with pytest.raises(TopologyError) as info:
        topo = load_topology(source, overrides)
        if plan:
            build_plan(topo)
    text = str(info.value)
    assert "\n" not in text and text.startswith(info.value.place + ": ")
    return text


# ---------------------------------------------------------------------- the error kinds of the issue
def test_unknown_node_names_the_edge_field_and_lists_the_nodes():
    msg = error(base(), ["edges[0].from=teachr"])
    assert msg.startswith("edges[0].from: unknown node 'teachr'")
    assert "peers: teacher, student" in msg
    msg = error(base(ensembles={"ens": {"members": ["teacher", "student"]}}), ["edges[0].to=nobody"])
    assert msg.startswith("edges[0].to: unknown node 'nobody' (peers: teacher, student; ensembles: ens)")


def test_edge_into_a_frozen_peer_that_is_never_trained():
    raw = base()
    raw["peers"]["teacher"].update(frozen=True, init="ckpt/teacher.pt")
    raw["edges"] = [{"from": "student", "to": "teacher", "loss": "kl"}]
    msg = error(raw)
    assert msg.startswith("edges[0].to: ")
    assert "'teacher', which is never trained (frozen)" in msg


def test_edge_into_a_peer_in_no_stage_is_never_trained():
    raw = base(stages=[{"train": ["teacher"]}])
    msg = error(raw)
    assert msg.startswith("edges[0].to: ") and "in no stage's 'train' list" in msg


def test_frozen_peer_needs_init():
    raw = base()
    raw["peers"]["teacher"]["frozen"] = True
    assert error(raw).startswith("peers.teacher.frozen: a frozen peer needs 'init'")


def test_self_edge_on_a_loss_that_forbids_it():
    msg = error(base(), ["edges[0].from=student"])
    assert msg.startswith("edges[0].to: loss 'kd' does not allow a self-edge (student→student)")


def test_self_edge_from_a_pattern_names_the_pattern_entry():
    raw = base(edges=[{"pattern": "star", "center": "teacher", "over": ["student", "teacher"], "loss": "kl"}])
    msg = error(raw)
    assert msg.startswith("edges[0].over: loss 'kl' does not allow a self-edge (star teacher→teacher)")


def test_unknown_loss_suggests_close_names():
    msg = error(base(), ["edges[0].loss=kdd"])
    assert msg.startswith("edges[0].loss: unknown loss 'kdd'") and "did you mean kd" in msg


def test_unknown_model_suggests_close_names():
    msg = error(base(), ["peers.student.model=resnet3"])
    assert msg.startswith("peers.student.model: unknown model 'resnet3'") and "did you mean resnet32" in msg


def test_unknown_model_far_from_everything_lists_known_ones():
    msg = error(base(), ["peers.student.model=qqqqqqqqqqqq"])
    assert msg.startswith("peers.student.model: unknown model 'qqqqqqqqqqqq' (known: ") and "convnet" in msg


def test_unknown_combiner_and_virtual_kind_suggest():
    raw = base(ensembles={"ens": {"members": ["teacher", "student"], "combine": "mean_"}})
    assert error(raw).startswith("ensembles.ens.combine: unknown combiner 'mean_' (did you mean mean")
    raw = base(virtual={"smooth": {"kind": "uniforn"}})
    assert error(raw).startswith("virtual.smooth.kind: unknown virtual teacher 'uniforn' (did you mean uniform")


@pytest.mark.parametrize("override, place, part", [
    ("train.epochs=three", "train.epochs", "valid integer"),
    ("train.epochs=0", "train.epochs", "greater than or equal to 1"),
    ("peers.teacher.optimizer.lr=-0.1", "peers.teacher.optimizer.lr", "greater than 0"),
    ("peers.teacher.optimizer.lr=.nan", "peers.teacher.optimizer.lr", "finite number"),
    ("peers.teacher.optimizer.betas=[0.9, 1.5]", "peers.teacher.optimizer.betas[1]", "less than 1"),
    ("edges[0].weight=.inf", "edges[0].weight", "finite number"),
    ("edges[0].temperature=abc", "edges[0].temperature", "valid number"),
    ("edges[0].temperature=.nan", "edges[0].temperature", "finite number"),
    ("edges[0].to=[student, 5]", "edges[0].to[1]", "valid string (got 5)"),
    ("peers.teacher=5", "peers.teacher", "valid dictionary"),
    ("peers.teacher.model_args=[1]", "peers.teacher.model_args", "valid dictionary (got a list)"),
    ("edges=null", "edges", "valid list (got None)"),
    ("data.synthetic.shape=[0, 8, 8]", "data.synthetic.shape[0]", "greater than or equal to 1"),
])
def test_bad_types_and_ranges(override, place, part):
    msg = error(base(), [override])
    assert msg.startswith(place + ": ") and part in msg


def test_union_field_of_the_wrong_type_names_both_forms():
    msg = error(base(), ["edges[0].to=5"])
    assert msg.startswith("edges[0].to: Input should be a valid string or a valid list (got 5)")


def test_missing_required_fields():
    raw = base()
    del raw["peers"]["teacher"]["model"]
    assert error(raw) == "peers.teacher.model: required but missing"
    raw = base()
    del raw["data"]
    assert error(raw) == "data: required but missing"


def test_a_stage_that_trains_nothing():
    raw = base(stages=[{"name": "t", "train": ["teacher"]}, {"name": "s", "train": []}])
    assert error(raw).startswith("stages[1].train: the stage trains nothing")


def test_every_peer_frozen_trains_nothing():
    raw = base(edges=[])
    for p in raw["peers"].values():
        p.update(frozen=True, init="x.pt")
    assert error(raw).startswith("peers: every peer is frozen")


def test_stage_lists_unknown_frozen_or_repeated_peers():
    assert error(base(stages=[{"train": ["studnet"]}])).startswith(
        "stages[0].train[0]: unknown peer 'studnet' (did you mean student")
    raw = base(stages=[{"train": ["student", "student"]}])
    raw["peers"]["teacher"]["init"] = "t.pt"
    assert error(raw).startswith("stages[0].train[1]: peer 'student' is listed twice")


def test_cycle_in_stage_dependencies():
    raw = base(stages=[{"name": "a", "train": ["teacher"], "after": ["b"]},
                       {"name": "b", "train": ["student"], "after": ["a"]}])
    msg = error(raw)
    assert msg.startswith("stages[0].after: stages depend on each other in a cycle")
    assert "a → b → a" in msg


def test_unknown_stage_in_after_and_duplicate_stage_names():
    raw = base(stages=[{"name": "a", "train": ["teacher"], "after": ["zz"]}])
    assert error(raw).startswith("stages[0].after: unknown stage 'zz' (stages: a)")
    raw = base(stages=[{"name": "a", "train": ["teacher"]}, {"name": "a", "train": ["student"]}])
    assert error(raw).startswith("stages[1].name: duplicate stage name 'a'")


def test_stage_order_follows_after():
    raw = base(stages=[{"name": "student", "train": ["student"], "after": ["teacher"], "epochs": 3},
                       {"name": "teacher", "train": ["teacher"]}])
    topo = load_topology(raw)
    assert [s.name for s in topo.stages] == ["teacher", "student"]
    assert [s.epochs for s in topo.stages] == [2, 3] and topo.total_epochs == 5
    assert topo.trained_stage("teacher") == 0 and topo.trained_stage("student") == 1


def test_source_trained_in_a_later_stage_than_its_target():
    raw = base(stages=[{"name": "s", "train": ["student"]}, {"name": "t", "train": ["teacher"]}])
    msg = error(raw)
    assert msg.startswith("edges[0].from: 'teacher' is first trained in stage 't', after this edge teaches 'student' "
                          "(stage 's')")


def test_stage_edges_must_name_edges():
    raw = base(stages=[{"name": "t", "train": ["teacher"]}, {"name": "s", "train": ["student"], "edges": ["kd1"]}])
    raw["edges"][0]["name"] = "kd"
    assert error(raw).startswith("stages[1].edges[0]: unknown edge name 'kd1' (did you mean kd")
    raw["edges"][0].pop("name")
    assert error(raw) == "stages[1].edges[0]: unknown edge name 'kd1' (no edge has a 'name')"


def test_edge_active_in_no_stage():
    raw = base(stages=[{"name": "t", "train": ["teacher"]}, {"name": "s", "train": ["student"], "edges": ["other"]}])
    raw["edges"][0]["name"] = "kd"
    raw["edges"].append({"name": "other", "from": "teacher", "to": "student", "loss": "kl"})
    assert error(raw).startswith("edges[0].name: the edge into 'student' is active in no stage: the stages that train "
                                 "it (stages[1]) list other 'edges'")


def test_source_order_counts_the_stage_where_the_edge_is_active():
    # the student trains alone first, then with the teacher's KD once the teacher is trained
    raw = base(stages=[{"name": "warm", "train": ["student"], "edges": []},
                       {"name": "t", "train": ["teacher"]},
                       {"name": "s", "train": ["student"], "edges": ["kd"]}])
    raw["edges"][0]["name"] = "kd"
    assert [s.name for s in load_topology(raw).stages] == ["warm", "t", "s"]
    raw["stages"][0]["edges"] = ["kd"]
    assert error(raw).startswith("edges[0].from: 'teacher' is first trained in stage 't', after this edge teaches "
                                 "'student' (stage 'warm')")


def test_source_trained_later_is_fine_with_init():
    raw = base(stages=[{"name": "s", "train": ["student"]}, {"name": "t", "train": ["teacher"]}])
    raw["peers"]["teacher"]["init"] = "teacher.pt"
    assert [s.name for s in load_topology(raw).stages] == ["s", "t"]


def test_source_in_no_stage_and_without_init_would_teach_untrained():
    msg = error(base(stages=[{"train": ["student"]}]))
    assert msg.startswith("edges[0].from: 'teacher' is in no stage's 'train' list and has no 'init'")


def test_ensemble_source_member_trained_later():
    raw = base(ensembles={"ens": {"members": ["teacher", "student"]}},
               edges=[{"from": "ens", "to": "student", "loss": "kl"}],
               stages=[{"name": "s", "train": ["student"]}, {"name": "t", "train": ["teacher"]}])
    assert error(raw).startswith("edges[0].from: 'teacher' is first trained in stage 't'")


def test_only_peers_learn():
    raw = base(ensembles={"ens": {"members": ["teacher", "student"]}},
               edges=[{"from": "teacher", "to": "ens", "loss": "kl"}])
    assert error(raw).startswith("edges[0].to: 'ens' is an ensemble node: only peers learn")


def test_duplicate_edges_are_an_error():
    raw = base()
    raw["edges"].append(dict(raw["edges"][0], temperature=2))
    assert error(raw).startswith("edges[1].to: the kd edge teacher→student is already given by edges[0]")


def test_edge_with_an_empty_target_list():
    assert error(base(), ["edges[0].to=[]"]) == "edges[0].to: lists no target peer"


def test_node_names_must_be_simple():
    raw = base()
    raw["peers"]["a.b"] = {"model": "mlp"}
    assert error(raw).startswith("peers: node name 'a.b' is not allowed")
    raw = base()
    raw["peers"][3] = {"model": "mlp"}
    assert error(raw).startswith("peers: node name 3 is not allowed")


def test_topology_name_must_be_usable_in_a_path():
    assert error(base(name="../x")).startswith("name: '../x' is not usable as a run name")
    assert error(base(name="a\nb")).startswith("name: 'a\\nb' is not usable as a run name")
    load_topology(base(name="quick-kd.v2_1"))


def test_a_name_used_twice_across_sections():
    raw = base(ensembles={"teacher": {"members": ["student"]}})
    assert error(raw).startswith("ensembles.teacher: the name is already used in peers")


def test_ensemble_member_and_colocate_must_be_peers():
    raw = base(ensembles={"ens": {"members": ["teacher", "nobody"]}})
    assert error(raw).startswith("ensembles.ens.members[1]: unknown peer 'nobody'")
    assert error(base(engine={"colocate": [["teacher", "x"]]})).startswith("engine.colocate[0][1]: unknown peer 'x'")
    assert error(base(engine={"colocate": [["teacher"], ["student", "teacher"]]})).startswith(
        "engine.colocate[1][1]: peer 'teacher' is already in colocate[0]")


def test_linear_combiner_needs_a_holdout():
    raw = base(ensembles={"ens": {"members": ["teacher", "student"], "combine": "linear"}})
    assert error(raw).startswith("ensembles.ens.combine: 'linear' refits on a held-out split: set data.holdout")
    raw["data"]["holdout"] = 0.1
    load_topology(raw)


def test_bad_device():
    assert error(base(), ["train.device=gpu0"]).startswith("train.device: not a device: 'gpu0'")
    load_topology(base(), ["train.device=cuda:1"])  # a valid name; availability is the engine's business


# ---------------------------------------------------------------------- strict sections, enums, params
def test_unknown_key_in_a_strict_section_lists_allowed_keys():
    msg = error(base(), ["data.batchsize=8"])
    assert msg.startswith("data.batchsize: unknown key, did you mean 'batch_size'?")
    assert "(allowed: dataset, root, download, batch_size," in msg
    msg = error(base(), ["peers.teacher.optimizer.foo=1"])
    assert msg == "peers.teacher.optimizer.foo: unknown key (allowed: name, lr, momentum, nesterov, weight_decay, betas)"


def test_unknown_key_inside_list_items_lists_allowed_keys():
    raw = base(stages=[{"train": ["teacher"], "trian": ["student"]}])
    assert error(raw).startswith("stages[0].trian: unknown key, did you mean 'train'? (allowed: name, train, epochs, after")
    assert error(base(), ["edges[0].schedule.foo=1"]).startswith(
        "edges[0].schedule.foo: unknown key (allowed: name, epochs, milestones, gamma")


def test_unknown_top_level_key():
    assert error(base(), ["edgse=[]"]).startswith("edgse: unknown key, did you mean 'edges'? (allowed: name, description")


def test_unknown_key_that_cannot_be_a_place_is_quoted_in_the_message():
    raw = base()
    raw["data"]["a: b"] = 1
    assert error(raw).startswith("data: unknown key 'a: b' (allowed: dataset,")
    raw = base()
    raw["train"][7] = 1
    assert error(raw) == "train: the key 7 must be a string (quote it)"


def test_unknown_loss_parameter_lists_the_loss_parameters_and_the_edge_keys():
    msg = error(base(), ["edges[0].temprature=2"])
    assert msg.startswith("edges[0].temprature: unknown key, did you mean 'temperature'? "
                          "(loss 'kd' takes temperature, alpha, reduction; besides ")
    assert "from, to, loss, weight, schedule, until_epoch, pattern, over, center" in msg


def test_bad_loss_and_combiner_parameter_values():
    assert error(base(), ["edges[0].alpha=2"]).startswith("edges[0].alpha: Input should be less than or equal to 1 (got 2)")
    assert error(base(), ["edges[0].reduction=sum"]).startswith("edges[0].reduction: Input should be 'batchmean' or 'mean'")
    raw = base(virtual={"smooth": {"kind": "tfkd", "correct_prob": 1.5}})
    assert error(raw).startswith("virtual.smooth.correct_prob: Input should be less than 1")
    raw = base(ensembles={"ens": {"members": ["teacher"], "weights": [1]}})
    assert error(raw).startswith("ensembles.ens.weights: unknown key (combiner 'mean' takes no parameters; besides members")


def test_bad_enum_value_lists_allowed_values():
    msg = error(base(), ["peers.teacher.optimizer.name=adamm"])
    assert msg.startswith("peers.teacher.optimizer.name: Input should be 'sgd', 'adam' or 'adamw' (got 'adamm')")
    assert "did you mean 'adam'" in msg
    msg = error(base(), ["data.dataset=mnist"])
    assert msg.startswith("data.dataset: Input should be 'cifar10', 'cifar100', 'digits', 'imagefolder' or 'synthetic'")


def test_pattern_entry_errors():
    raw = base(edges=[{"pattern": "all_pairs", "over": ["teacher"], "loss": "kl"}])
    assert error(raw) == "edges[0]: pattern 'all_pairs' needs 'over' with at least 2 nodes"
    raw = base(edges=[{"pattern": "star", "over": ["student"], "loss": "kl"}])
    assert error(raw).startswith("edges[0]: pattern 'star' needs 'center'")
    raw = base(edges=[{"pattern": "ring", "over": ["teacher", "student"], "from": "teacher", "loss": "kl"}])
    assert error(raw).startswith("edges[0]: a 'ring' pattern takes 'over', not 'from'/'to'")
    raw = base(edges=[{"pattern": "rings", "over": ["teacher", "student"], "loss": "kl"}])
    assert error(raw).startswith("edges[0].pattern: Input should be 'all_pairs', 'ring', 'star' or 'chain' (got 'rings')")
    raw = base(edges=[{"to": "student", "loss": "kl"}])
    assert error(raw).startswith("edges[0]: an edge needs 'from' and 'to'")


# ---------------------------------------------------------------------- like
def test_like_copies_and_overrides():
    raw = quick("kdcl")
    topo = load_topology(raw)
    assert topo.config.peers["b"].model == "convnet_small"
    assert topo.config.peers["b"].optimizer.lr == 0.05 and topo.config.peers["b"].schedule.name == "cosine"


def test_like_cycle():
    raw = base()
    raw["peers"]["teacher"]["like"] = "student"
    raw["peers"]["student"]["like"] = "teacher"
    msg = error(raw)
    assert msg.startswith("peers.student.like: peers copy each other in a circle: teacher → student → teacher")
    raw = base()
    raw["peers"]["teacher"]["like"] = "teacher"
    assert error(raw) == "peers.teacher.like: peers copy each other in a circle: teacher → teacher"


def test_unknown_like():
    msg = error(base(), ["peers.student.like=teachr"])
    assert msg.startswith("peers.student.like: unknown peer 'teachr' (did you mean teacher")
    msg = error(base(), ["peers.student.like=[teacher]"])
    assert msg.startswith("peers.student.like: takes the name of another peer (got a list")


# ---------------------------------------------------------------------- patterns
def three(pattern, **extra) -> dict:
    return {"name": "p", "data": {"dataset": "digits"},
            "peers": {n: {"model": "mlp"} for n in ("a", "b", "c")},
            "edges": [{"pattern": pattern, "over": extra.pop("over", ["a", "b", "c"]), "loss": "kl", **extra}]}


def pairs(topo):
    return [(e.source, e.target) for e in topo.edges]


def test_all_pairs_over_three_gives_six_edges():
    topo = load_topology(three("all_pairs", temperature=3))
    assert sorted(pairs(topo)) == sorted([(s, t) for s in "abc" for t in "abc" if s != t])
    assert all(e.origin == "edges[0]" and e.params == {"temperature": 3} and e.pattern == "all_pairs" for e in topo.edges)
    assert [e.index for e in topo.edges] == list(range(6))


def test_ring_chain_star():
    assert pairs(load_topology(three("ring"))) == [("c", "a"), ("a", "b"), ("b", "c")]
    assert pairs(load_topology(three("ring", over=["a", "b"]))) == [("a", "b"), ("b", "a")]
    assert pairs(load_topology(three("chain"))) == [("a", "b"), ("b", "c")]
    assert pairs(load_topology(three("star", center="a", over=["b", "c"]))) == [("a", "b"), ("a", "c")]


def test_list_valued_to_expands():
    raw = three("chain")
    raw["edges"] = [{"from": "a", "to": ["b", "c"], "loss": "kl"}]
    assert pairs(load_topology(raw)) == [("a", "b"), ("a", "c")]


def test_error_inside_a_pattern_names_its_entry():
    raw = three("all_pairs")
    raw["edges"].insert(0, {"from": "a", "to": "b", "loss": "kd"})
    raw["edges"][1]["over"] = ["a", "b", "d"]
    assert error(raw).startswith("edges[1].over: unknown node 'd' (peers: a, b, c)")
    raw = three("star", center="z", over=["b", "c"])
    assert error(raw).startswith("edges[0].center: unknown node 'z'")
    raw = three("all_pairs", temperature=-1)
    assert error(raw).startswith("edges[0].temperature: Input should be greater than 0")


def test_quick_dml_pattern_expands_to_both_directions():
    assert pairs(load_topology(quick("dml"))) == [("a", "b"), ("b", "a")]
    assert pairs(load_topology(quick("takd"))) == [("teacher", "assistant"), ("assistant", "student")]


# ---------------------------------------------------------------------- --set
def test_parse_override_reads_values_as_yaml():
    assert parse_override("edges[0].temperature=2") == ("edges[0].temperature", 2)
    assert parse_override("peers.a.optimizer.lr=0.01") == ("peers.a.optimizer.lr", 0.01)
    assert parse_override("edges=[]") == ("edges", [])
    assert parse_override("name=a=b") == ("name", "a=b")
    assert parse_override("tracking.experiment=") == ("tracking.experiment", "")
    with pytest.raises(TopologyError, match=r"^--set: expected PATH=VALUE"):
        parse_override("train.epochs")


def test_set_overrides_any_field():
    topo = load_topology(quick("dml"), ["edges[0].temperature=2", "peers.a.optimizer.lr=0.01", "train.epochs=3"])
    assert all(e.params["temperature"] == 2 for e in topo.edges)
    assert topo.config.peers["a"].optimizer.lr == 0.01
    assert topo.config.peers["b"].optimizer.lr == 0.01  # b is like a: the override lands before 'like'
    assert topo.total_epochs == 3
    topo = load_topology(quick("kd"), ["edges=[]"])
    assert topo.edges == []
    topo = load_topology(quick("kd"), {"edges.0.alpha": 0.5, "peers.student.model_args": {"widths": [4, 8]}})
    assert topo.edges[0].params["alpha"] == 0.5 and topo.config.peers["student"].model_args == {"widths": [4, 8]}


def test_set_creates_missing_sections():
    topo = load_topology(quick("dml"), ["peers.b.optimizer.lr=0.2", "ensembles.ens.members=[a, b]"])
    assert topo.config.peers["b"].optimizer.lr == 0.2 and topo.config.peers["b"].optimizer.nesterov
    assert topo.config.ensembles["ens"].members == ["a", "b"]


def test_set_with_a_bad_index_names_the_path():
    assert error(quick("kd"), ["edges[3].temperature=2"]) == "edges[3]: no such item (the list has 1)"
    assert error(quick("kd"), ["stages[0].train[5]=x"]) == "stages[0].train[5]: no such item (the list has 1)"
    assert error(quick("kd"), ["edges.name=x"]).startswith("edges: a list: name an item by its index")
    assert error(quick("kd"), ["name.x=1"]).startswith("name: cannot set 'x' inside 'quick-kd'")
    assert error(quick("kd"), ["edges[0]..x=1"]).startswith("--set: 'edges[0]..x' is not a dotted path")


@pytest.mark.parametrize("name", ["dml", "kd", "kdcl", "takd"])
def test_to_yaml_loads_again_as_the_same_topology(name):
    topo = load_topology(quick(name), ["edges[0].weight=0.5"])
    text = topo.to_yaml()
    assert "from edges[0]" in text
    again = load_topology(yaml.safe_load(text))
    assert [(e.source, e.target, e.loss, e.weight, e.params) for e in again.edges] == \
        [(e.source, e.target, e.loss, e.weight, e.params) for e in topo.edges]
    assert [(s.name, s.train, s.epochs) for s in again.stages] == [(s.name, s.train, s.epochs) for s in topo.stages]
    assert again.config.peers == topo.config.peers


def test_load_does_not_change_its_input():
    raw = quick("dml")
    before = copy.deepcopy(raw)
    load_topology(raw, ["edges[0].temperature=3"])
    assert raw == before


# ---------------------------------------------------------------------- weight schedules
def edge_with(**extra):
    raw = base()
    raw["edges"][0].update(weight=2.0, **extra)
    return load_topology(raw).edges[0]


def test_linear_warmup_weight():
    e = edge_with(schedule={"name": "linear_warmup", "epochs": 4})
    assert [e.weight_at(i) for i in range(6)] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.0]


def test_step_weight():
    e = edge_with(schedule={"name": "step", "milestones": [2, 4], "gamma": 0.5})
    assert [e.weight_at(i) for i in range(6)] == [2.0, 2.0, 1.0, 1.0, 0.5, 0.5]


def test_until_epoch_and_constant_weight():
    e = edge_with(until_epoch=3)
    assert [e.weight_at(i) for i in range(5)] == [2.0, 2.0, 2.0, 0.0, 0.0]
    e = edge_with(until_epoch=2, schedule={"name": "linear_warmup", "epochs": 2})
    assert [e.weight_at(i) for i in range(4)] == [0.0, 1.0, 0.0, 0.0]
    assert edge_with().weight_at(100) == 2.0


def test_bad_weight_schedule():
    msg = error(base(), ["edges[0].schedule.name=cosine"])
    assert msg.startswith("edges[0].schedule.name: Input should be 'constant', 'linear_warmup', ")
    assert msg.endswith(" (got 'cosine')")
    assert error(base(), ["edges[0].schedule.epochs=-1"]).startswith("edges[0].schedule.epochs: Input should be greater")


# ---------------------------------------------------------------------- dry forward: taps and shapes
def feature(tap="pool", **params):
    return base(edges=[{"from": "teacher", "to": "student", "loss": "test_feature_mse", "tap": tap, **params}])


def test_feature_loss_with_matching_taps_plans():
    raw = feature("pool")
    raw["peers"]["student"]["model"] = "mlp"  # convnet pool [64] = mlp pool [64]
    plan = build_plan(load_topology(raw))
    assert plan.shapes["teacher"]["pool"] == (64,) and plan.shapes["student"]["pool"] == (64,)
    assert plan.stage_taps[0] == {"teacher": {"logits", "pool"}, "student": {"logits", "pool"}}
    [t] = [t for t in plan.transfers if t.tap == "pool"]
    assert (t.source, t.target, t.bytes_per_step) == ("teacher", "student", 64 * 8 * 4)


def test_tap_a_model_does_not_have():
    msg = error(feature("stage9"), plan=True)
    assert msg.startswith("edges[0].tap: peer 'teacher' (convnet) has no tap 'stage9' (taps: stage1, stage1_pre,")
    assert "pool, logits, module:<path>" in msg


def test_tap_missing_only_on_the_target():
    raw = feature("stage3")  # convnet has 3 stages, convnet_small 2
    assert error(raw, plan=True).startswith("edges[0].tap: peer 'student' (convnet_small) has no tap 'stage3'")
    raw = feature("pool", target_tap="stage7")
    assert error(raw, plan=True).startswith("edges[0].target_tap: peer 'student' (convnet_small) has no tap 'stage7'")


def test_module_tap_that_does_not_exist():
    msg = error(feature("module:nope"), plan=True)
    assert msg.startswith("edges[0].tap: peer 'teacher' (convnet) has no tap 'module:nope'")


def test_shape_mismatch_found_by_the_dry_forward():
    msg = error(feature("pool"), plan=True)  # convnet pool [64] vs convnet_small pool [16]
    assert msg == "edges[0]: teacher→student (test_feature_mse): tap shapes differ: source [64], target [16]"
    msg = error(feature("stage1"), plan=True)
    assert msg.startswith("edges[0]: teacher→student (test_feature_mse): tap shapes differ: source [16, 8, 8], target [8, 8, 8]")


def test_feature_taps_from_a_non_peer_source():
    raw = feature("pool")
    raw["ensembles"] = {"ens": {"members": ["teacher"]}}
    raw["edges"][0]["from"] = "ens"
    assert error(raw).startswith("edges[0].from: loss 'test_feature_mse' takes a source of kind peer, not the ensemble 'ens'")


def test_junk_model_args_are_placed_at_model_args():
    msg = error(base(), ["peers.teacher.model_args={widths: [8, 16]}"], plan=True)
    assert msg.startswith("peers.teacher.model_args: cannot build 'convnet' for 1-channel inputs and 10 classes: "
                          "ValueError: widths and strides must have the same length")
    msg = error(base(), ["peers.teacher.model_args={depth: 3}"], plan=True)
    assert msg.startswith("peers.teacher.model_args: cannot build 'convnet'") and "unexpected keyword argument 'depth'" in msg
    msg = error(base(), ["peers.teacher.model_args={widths: [0, 0, 0]}"], plan=True)
    assert msg.startswith("peers.teacher.model_args: 'convnet' fails a dry forward on a 2×1×8×8 batch (digits): RuntimeError")


def test_model_that_cannot_take_the_input_size():
    raw = base(data={"dataset": "synthetic", "synthetic": {"shape": [1, 2, 2], "num_classes": 10}})
    raw["peers"]["student"]["model"] = "vgg8"  # its max-pools need more than 2×2 pixels
    msg = error(raw, plan=True)
    assert msg.startswith("peers.student.model: 'vgg8' fails a dry forward on a 2×1×2×2 batch (synthetic): RuntimeError: ")


def test_data_errors_are_topology_errors():
    msg = error(base(), ["data.dataset=imagefolder", "data.root=/nonexistent/x"], plan=True)
    assert msg.startswith("data.root: no ImageFolder tree under /nonexistent/x")


# ---------------------------------------------------------------------- files and the CLI
def test_file_errors(tmp_path):
    assert error(tmp_path / "missing.yaml") == f"{tmp_path / 'missing.yaml'}: no such topology file"
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\npeers: [a\n")
    assert error(bad).startswith(f"{bad}:3:1: not valid YAML")
    bad.write_text("- a\n- b\n")
    assert error(bad).startswith(f"{bad}: a topology is a mapping")
    bad.write_bytes(b"\xff\xfe\x00bad")
    assert error(bad).startswith(f"{bad}: cannot read the file")


def test_source_that_is_neither_a_file_nor_a_mapping():
    assert error([1, 2]) == "topology: expected a YAML file or a mapping (got a list)"
    assert error(None) == "topology: expected a YAML file or a mapping (got None)"


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "online_kd.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


@pytest.mark.parametrize("name, mutate, expected", [
    ("unknown_node", lambda r: r["edges"][0].update({"from": "teachr"}), "error: edges[0].from: unknown node 'teachr'"),
    ("unknown_model", lambda r: r["peers"]["student"].update(model="resnet3"),
     "error: peers.student.model: unknown model 'resnet3' (did you mean resnet32"),
    ("model_args", lambda r: r["peers"]["teacher"].update(model_args={"widths": [4, 8]}),
     "error: peers.teacher.model_args: cannot build 'convnet'"),
    ("dry_forward", lambda r: r["peers"]["teacher"].update(model_args={"widths": [0, 0, 0]}),  # torch warns, too
     "error: peers.teacher.model_args: 'convnet' fails a dry forward on a 2×1×8×8 batch"),
])
def test_cli_validate_exits_2_with_one_line(tmp_path, name, mutate, expected):
    raw = quick("kd")
    mutate(raw)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    r = run_cli("validate", path, cwd=tmp_path)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), r.stderr


def test_cli_set_errors_exit_2(tmp_path):
    r = run_cli("validate", QUICK / "kd.yaml", "--set", "edges[4].temperature=2", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip() == "error: edges[4]: no such item (the list has 1)"
    r = run_cli("validate", QUICK / "kd.yaml", "--set", "edges=[]", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ok: quick-kd: 2 peers, 0 ensembles, 0 edges")


@pytest.mark.parametrize("name", ["sp", "rkd", "crd", "infoflow"])
def test_losses_relating_a_batch_accept_replicas_on_ray(name):
    """SP/RKD's relations, CRD's banks and infoflow's kernels gather the whole batch over a peer's replicas
    (online_kd.engine.gather), so the ray engine takes replicas on their peers."""
    raw = yaml.safe_load((QUICK / f"{name}.yaml").read_text())
    topo = load_topology(raw, {"engine.name": "ray", **{f"peers.{p}.replicas": 2 for p in raw["peers"]}})
    assert {p.replicas for p in topo.config.peers.values()} == {2}

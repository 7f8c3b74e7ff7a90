"""Config schema: defaults, validation errors that name the key, sweeps, run reuse."""

from __future__ import annotations

from pathlib import Path

import pytest

from rotelab.config import Config, config_from_dict, expand_sweep, load_config, result_differences
from rotelab.errors import RotelabError
from rotelab.run import Run

ROOT = Path(__file__).parents[1]


@pytest.mark.parametrize("name", ["tiny", "tiny-ablations", "tiny-meaningful", "smollm2-demo", "paper-qwen2.5-1.5b", "repro-smollm2"])
def test_shipped_configs_load(name: str) -> None:
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    assert cfg.name == name


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    "text, needle",
    [
        ("phase1:\n  epochz: 3\n", "phase1.epochz: unknown key"),
        ("phase1:\n  epochs: many\n", "phase1.epochs"),
        ("data:\n  facts_per_relation: 5\nphase2:\n  k: 10\n", "phase2.k=10 is larger than data.facts_per_relation=5"),
        ("phase1:\n  loss_mask: objects\n", "phase1.loss_mask"),
        ("sweep:\n  phase2.kk: [1, 2]\n", "unknown key 'phase2.kk'"),
        ("- just\n- a list\n", "must be a YAML mapping"),
        ("phase1: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_configs_name_file_and_key(tmp_path: Path, text: str, needle: str) -> None:
    p = _write(tmp_path, text)
    with pytest.raises(RotelabError) as exc:
        load_config(p)
    msg = str(exc.value)
    assert str(p) in msg and needle in msg and "\n" not in msg


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(RotelabError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_sweep_expands_into_named_siblings() -> None:
    cfg = Config(name="s", data={"facts_per_relation": 20}, sweep={"seed": [0, 1], "phase2.k": [1, 10]})
    runs = expand_sweep(cfg)
    assert [r.name for r in runs] == ["s-seed=0-k=1", "s-seed=0-k=10", "s-seed=1-k=1", "s-seed=1-k=10"]
    assert [(r.seed, r.phase2.k) for r in runs] == [(0, 1), (0, 10), (1, 1), (1, 10)]
    assert all(not r.sweep for r in runs)


def test_sweep_cases_set_several_keys_together() -> None:
    from rotelab.config import config_from_dict

    cfg = Config(name="a", data={"facts_per_relation": 20},
                 sweep={"seed": [0, 1], "case": [{"name": "C1", "inject.facts_per_relation": 4, "inject.epochs": 3},
                                                  {"name": "C2", "phase1.mode": "no_key"}]})
    runs = expand_sweep(cfg)
    assert [r.name for r in runs] == ["a-seed=0-case=C1", "a-seed=0-case=C2", "a-seed=1-case=C1", "a-seed=1-case=C2"]
    assert [(r.phase1.mode, r.inject.facts_per_relation, r.inject.epochs) for r in runs[:2]] == [("key", 4, 3), ("no_key", 0, 20)]
    for bad, needle in (({"case": [{"phase1.mode": "no_key"}]}, "non-empty 'name'"),
                        ({"case": [{"name": "x", "phase1.nope": 1}]}, "unknown key 'phase1.nope'"),
                        ({"case": [{"name": "a=b"}]}, "contains '='"),
                        ({"case": [{"name": "x"}, {"name": "x"}]}, "repeated"),
                        ({"case": [{"name": "C2", "phase1.mode": "no_key", "inject.facts_per_relation": 2}]}, "needs phase1.mode 'key'")):
        with pytest.raises(RotelabError, match=needle):
            expand_sweep(config_from_dict({"name": "a", "sweep": bad}, "t.yaml"))


def test_result_differences_ignore_runtime_knobs() -> None:
    a = Config(name="a")
    b = Config(name="b", eval={"batch_size": 3}, phase1={"lr": 1e-3}, data={"relations": ["capital"]})
    assert result_differences(a, b) == ["data.relations", "phase1.lr"]


def test_reusing_a_run_with_another_config_names_the_keys(tmp_path: Path) -> None:
    cfg = Config(name="r", data={"relations": ["capital"], "facts_per_relation": 5}, phase2={"k": 2})
    Run.create(cfg, tmp_path / "r")
    # same results-relevant config: fine, and runtime knobs may change
    Run.create(cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"batch_size": 7})}), tmp_path / "r")
    other = Config(name="r", data={"relations": ["capital"], "facts_per_relation": 6}, phase2={"k": 2}, seed=3)
    with pytest.raises(RotelabError) as exc:
        Run.create(other, tmp_path / "r")
    assert "data.facts_per_relation" in str(exc.value) and "seed" in str(exc.value)
    assert str(tmp_path / "r" / "config.yaml") in str(exc.value)


def test_run_records_versions_and_seed(tmp_path: Path) -> None:
    import yaml

    run = Run.create(Config(name="v", seed=7, data={"relations": ["capital"], "facts_per_relation": 5}, phase2={"k": 2}), tmp_path / "v")
    data = yaml.safe_load(run.config_path.read_text())
    assert data["provenance"]["seed"] == 7
    assert data["provenance"]["versions"]["torch"].startswith("2.")
    assert Run.open(run.root).config == run.config


# ---------------------------------------------------------------- result keys, fingerprint, patching section

#: The store config fingerprints of the shipped configs, computed by the code before the result
#: keys were declared per field (main at fce54cc): a changed value would refuse every old store.
OLD_FINGERPRINTS = {
    "paper-qwen2.5-1.5b.yaml": ["67492747c9ee1f46"],
    "repro-smollm2.yaml": ["ab4733440a8bba08", "3a0eca3c3bbd721e", "e79885860c0e1c9b"],
    "smollm2-demo.yaml": ["5b55807ce85ffa18"],
    "tiny-ablations.yaml": ["2955c41fd45d81ee"],
    "tiny-meaningful.yaml": ["185b4a8c90b9334c"],
    "tiny.yaml": ["2f9aef6f414ae198"],
}


def test_fingerprints_of_unchanged_configs_are_the_old_ones() -> None:
    from rotelab.run import config_sha256

    root = Path(__file__).resolve().parents[1] / "configs"
    for name, want in OLD_FINGERPRINTS.items():
        assert [config_sha256(c) for c in expand_sweep(load_config(root / name))][: len(want)] == want, name
    # non-default values in result keys and settings, as the old code hashed them
    cfg = Config(analyses={"patching": {"enabled": True, "layers": [0, 2], "metric": "object_prob"}},
                 phase1={"lr": 0.01, "batch_size": 8}, phase2={"loss_mask": "full", "epochs": 3})
    assert config_sha256(cfg) == "1a81808d25d1f4ad"


def test_settings_are_declared_next_to_their_fields() -> None:
    from rotelab.config import NON_RESULT_KEYS, is_result_key

    assert NON_RESULT_KEYS == {
        "name", "sweep", "eval.batch_size", "eval.engine", "eval.gpu_memory_utilization", "eval.tensor_parallel_size",
        "eval.prefix_caching", "eval.kinds", "eval.icl_checkpoints", "capture.batch_size", "capture.kinds", "capture.layers", "capture.icl_checkpoints", "capture.device",
        "capture.device_map", "analyses.projections", "analyses.patching", "analyses.causal_trace", "analyses.reference_checkpoint",
        "analyses.projection_fit_on", "analyses.joint_kinds", "analyses.umap_layers", "train.keep_weights",
        "train.deepspeed",
    }
    assert not is_result_key("analyses.patching.layers") and is_result_key("analyses.probe_C") and is_result_key("phase1.lr")
    a = Config(name="a")
    b = Config(name="b", analyses={"patching": {"enabled": True, "layers": [1]}}, capture={"batch_size": 2})
    assert result_differences(a, b) == []


def test_phase_schedules_share_one_base_with_their_own_defaults() -> None:
    from rotelab.config import InjectConfig, Phase1Config, Phase2Config, TrainingStageConfig

    fields = ("epochs", "lr", "batch_size", "grad_accum", "loss_mask", "weight_decay", "save_every")
    for cls, defaults in ((Phase1Config, (20, 2e-4, 16, 1, "full", 0.0, "epoch")),
                          (Phase2Config, (5, 2e-5, 4, 1, "object", 0.0, "epoch")),
                          (InjectConfig, (20, 2e-4, 16, 1, "full", 0.0, "epoch"))):
        assert issubclass(cls, TrainingStageConfig)
        assert tuple(getattr(cls(), f) for f in fields) == defaults, cls.__name__
    for bad in ({"phase1": {"lr": 0}}, {"phase2": {"epochs": 0}}, {"inject": {"batch_size": 0}}, {"phase1": {"epochs": -1}}):
        with pytest.raises(RotelabError):
            config_from_dict(bad)
    assert Phase1Config(epochs=0).epochs == 0  # phase 1 may be skipped, phase 2 may not


def test_old_flat_patching_keys_name_the_new_ones() -> None:
    with pytest.raises(RotelabError, match=r"x.yaml: .*analyses.patching_layers is now analyses.patching.layers"):
        config_from_dict({"analyses": {"patching_layers": [1]}}, "x.yaml")
    with pytest.raises(RotelabError, match=r"analyses.patching.enabled: true"):
        config_from_dict({"analyses": {"patching": True}}, "x.yaml")
    assert config_from_dict({"analyses": {"patching": {"enabled": True, "metric": "object_prob"}}}).analyses.patching.metric == "object_prob"


def test_a_run_directory_stored_with_the_flat_keys_still_opens_with_its_fingerprint(tmp_path: Path) -> None:
    import yaml

    cfg = Config(name="r", data={"relations": ["capital"], "facts_per_relation": 5}, phase2={"k": 2},
                 analyses={"patching": {"enabled": True, "layers": [0, 1], "items_per_relation": 2}})
    run = Run.create(cfg, tmp_path / "r")
    want = run.fingerprint()
    stored = yaml.safe_load(run.config_path.read_text())
    section = stored["analyses"].pop("patching")  # rewrite it as the code before the section wrote it
    stored["analyses"].update({"patching": section.pop("enabled"), **{f"patching_{k}": v for k, v in section.items()}})
    run.config_path.write_text(yaml.safe_dump(stored))
    old = Run.open(tmp_path / "r")
    assert old.config.analyses.patching == cfg.analyses.patching
    assert old.fingerprint() == want
    Run.create(cfg, tmp_path / "r")  # reusing it with the new config is fine

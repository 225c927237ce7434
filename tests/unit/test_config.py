"""Training configs: YAML + --set overrides, readable refusals, and every shipped preset validates."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from engine.lab.errors import ConfigError
from engine.lab.settings import get_settings
from engine.lab.yamlfiles import read_yaml_mapping
from engine.train.config import (
    TrainConfig,
    dump_config,
    field_docs,
    load_config,
    parse_override,
    resolve_run_dir,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TRAIN_PRESETS = sorted(p for p in CONFIGS.glob("*.yaml") if not p.name.startswith(("sweep_", "sample_", "distill_")))


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_overrides_parse_as_yaml_and_keep_equals_signs(tmp_path):
    cfg = load_config(_write(tmp_path, "compile: true\nmax_iters: 100\n"),
                      ["compile=false", "learning_rate=3e-4", "dataset=x=y", "max_iters=1e3", "min_lr=0"])
    assert cfg.compile is False
    assert cfg.learning_rate == pytest.approx(3e-4)
    assert cfg.dataset == "x=y"
    assert parse_override("init_ckpt=/x/a=b.pt") == ("init_ckpt", "/x/a=b.pt")
    assert cfg.max_iters == 1000 and isinstance(cfg.max_iters, int)
    assert cfg.min_lr == 0.0


def test_yaml_exponent_without_dot_is_a_number(tmp_path):
    # PyYAML reads "1e-3" as a string; users write it that way in CrystaLLM configs.
    cfg = load_config(_write(tmp_path, "learning_rate: 1e-3\nmin_lr: 1e-4\n"))
    assert cfg.learning_rate == 1e-3 and cfg.resolved_min_lr == 1e-4


def test_scratch_fills_shape_from_preset_and_explicit_keys_win(tmp_path):
    cfg = load_config(_write(tmp_path, "preset: tiny\nn_layer: 3\n"))
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size) == (3, 2, 128, 256)
    default = load_config(None)
    assert (default.n_layer, default.n_embd, default.block_size) == (8, 512, 1024)  # CrystaLLM v1 small


def test_min_lr_ratio_and_lr_decay_defaults(tmp_path):
    cfg = load_config(None, ["learning_rate=1e-3", "min_lr_ratio=0.05", "max_iters=400"])
    assert cfg.resolved_min_lr == pytest.approx(5e-5)
    assert cfg.resolved_lr_decay_iters == 400


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["n_layr=4"], ["n_layr", "n_layer"]),
        (["n_embd=100", "n_head=3"], ["n_embd", "divisible", "n_head"]),
        (["warmup_iters=200", "max_iters=100"], ["warmup_iters", "max_iters"]),
        (["learning_rate=1e-4", "min_lr=1e-3"], ["min_lr", "learning_rate"]),
        (["block_size=4"], ["block_size", "8"]),
        (["init_from=finetune"], ["init_ckpt"]),
        (["init_from=resume"], ["resume", "out_dir"]),
        (["init_from=pretrained"], ["init_from", "scratch"]),
        (["max_iters=ten"], ["max_iters", "integer"]),
        (["compile=maybe"], ["compile", "true or false"]),
        (["dropout=1.5"], ["dropout"]),
        (["dtype=float8"], ["dtype"]),
        (["device=gpu"], ["device"]),
        (["min_lr=1e-5", "min_lr_ratio=0.1"], ["min_lr_ratio"]),
        (["freeze_embeddings=true"], ["finetune"]),
        (["preset=huge"], ["preset", "tiny"]),
        (["name=../escape"], ["name"]),
        (["underrep_p=0.5"], ["underrep_p"]),
        (["batch_size=0"], ["batch_size"]),
        (["noequals"], ["key=value"]),
        (["objective=contrastive"], ["objective", "next-token"]),
        (["objective=masked-diffusion", "lora_rank=8", "init_from=finetune", "init_ckpt=x.pt"],
         ["lora_rank", "masked-diffusion"]),
    ],
)
def test_bad_configs_are_refused_with_a_message_naming_the_key(overrides, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    message = str(err.value)
    for word in words:
        assert word in message, message


def test_finetune_shape_comes_from_checkpoint_so_preset_is_refused():
    with pytest.raises(ConfigError, match="preset"):
        load_config(None, ["init_from=finetune", "init_ckpt=/x/ckpt.pt", "preset=small"])
    cfg = load_config(None, ["init_from=finetune", "init_ckpt=/x/ckpt.pt", "block_size=256"])
    assert cfg.n_layer is None and cfg.block_size == 256  # filled from the checkpoint by the trainer


def test_crystallm_upstream_keys_are_translated(tmp_path):
    cfg = load_config(_write(tmp_path, "eval_iters_train: 7\neval_iters_val: 9\nalways_save_checkpoint: false\n"
                                       "validate: true\nunderrep_p: 0.0\nbeta2: 0.99\n"))
    assert cfg.eval_iters == 9


def test_missing_or_malformed_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(_write(tmp_path, "- a\n- b\n"))


def test_yaml_and_encoding_errors_are_one_line_naming_file_and_line(tmp_path, capsys):
    from engine.cli import main

    broken = tmp_path / "broken.yaml"
    broken.write_text("n_layer: 2\n  n_head: [1, 2\n")
    with pytest.raises(ConfigError) as exc:
        load_config(broken)
    assert "\n" not in str(exc.value) and str(exc.value).startswith(f"{broken}: line 2, column 9: ")
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("n_layer: 2\n# Li\xe8ge\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.yaml: line 2 is not UTF-8 \(byte 0xe8\); save the file as UTF-8$"):
        load_config(latin1)
    assert main(["sweep", str(broken)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{broken}: line 2" in err


def test_resume_takes_the_runs_saved_config_as_base(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    saved = load_config(None, ["preset=tiny", "dataset=mydata", "max_iters=50", "warmup_iters=5", "seed=7"])
    (run / "config.yaml").write_text(dump_config(saved))
    cfg = load_config(None, ["init_from=resume", f"out_dir={run}", "max_iters=80"])
    assert (cfg.dataset, cfg.seed, cfg.n_embd, cfg.max_iters) == ("mydata", 7, 128, 80)
    with pytest.raises(ConfigError, match="config.yaml"):
        load_config(None, ["init_from=resume", f"out_dir={tmp_path / 'nothing'}"])


def test_dumped_config_round_trips(tmp_path):
    cfg = load_config(None, ["preset=tiny", "max_iters=10", "warmup_iters=2"])
    again = load_config(_write(tmp_path, dump_config(cfg)))
    assert again == cfg


def test_every_key_is_documented():
    docs = field_docs()
    assert set(docs) == set(TrainConfig.__dataclass_fields__)
    assert all(docs.values()), [k for k, v in docs.items() if not v]


def test_presets_exist():
    names = {p.name for p in TRAIN_PRESETS}
    assert {"tiny_cpu.yaml", "nacl_ft_small.yaml", "continue_mix10000.yaml", "crystallm_v1_small.yaml",
            "crystallm_v1_large.yaml"} <= names


@pytest.mark.parametrize("path", TRAIN_PRESETS, ids=lambda p: p.name)
def test_every_training_preset_validates(path):
    cfg = load_config(path)
    raw = yaml.safe_load(path.read_text())
    assert cfg.max_iters == raw["max_iters"]
    if cfg.init_from == "scratch":
        assert cfg.n_embd % cfg.n_head == 0


def _saved_run(folder: Path) -> Path:
    folder.mkdir(parents=True)
    saved = load_config(None, ["preset=tiny", "seed=7", "max_iters=50", "warmup_iters=5"])
    (folder / "config.yaml").write_text(dump_config(saved))
    return folder


def test_resume_finds_the_run_by_readme_path_bare_name_or_absolute_path(tmp_path, monkeypatch):
    runs = get_settings().runs_dir
    run = _saved_run(runs / "train" / "r1")
    monkeypatch.chdir(runs.parent)  # the checkout, where the README's runs/train/RUN is typed
    spellings = [f"{runs.name}/train/r1", "r1", str(run)]
    for typed in spellings:
        cfg = load_config(None, ["init_from=resume", f"out_dir={typed}", "max_iters=80"])
        assert Path(cfg.out_dir) == run and cfg.seed == 7, typed
    monkeypatch.chdir(runs / "train")  # a path from the current folder wins over the runs root
    assert Path(load_config(None, ["init_from=resume", "out_dir=./r1", "max_iters=80"]).out_dir) == run
    monkeypatch.chdir(tmp_path)  # nothing here: a relative path is also looked up under <runs>/train/
    assert Path(load_config(None, ["init_from=resume", "out_dir=r1", "max_iters=80"]).out_dir) == run


def test_resume_of_a_missing_run_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as err:
        load_config(None, ["init_from=resume", "out_dir=runs/train/nothing"])
    message = str(err.value)
    assert message.startswith("cannot resume runs/train/nothing"), message  # not "overrides: ..."
    assert str(tmp_path / "runs" / "train" / "nothing") in message
    assert str(get_settings().train_dir / "runs" / "train" / "nothing") in message


def test_a_new_run_folder_is_a_bare_name_under_the_runs_root_or_a_path_from_here(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_run_dir("myrun") == get_settings().train_dir / "myrun"
    assert resolve_run_dir("runs/train/myrun") == tmp_path / "runs" / "train" / "myrun"
    assert resolve_run_dir("/abs/run") == Path("/abs/run")


def test_an_empty_config_file_is_refused(tmp_path):
    for text in ("", "# only a comment\n", "{}\n"):
        with pytest.raises(ConfigError, match="is empty"):
            load_config(_write(tmp_path, text))


def test_a_key_given_twice_is_refused_with_the_key_named(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, "max_iters: 5\nlearning_rate: 1e-3\nmax_iters: 7\n"))
    assert "'max_iters'" in str(err.value) and "lines 1 and 3" in str(err.value)
    # A key that overrides one brought in by a YAML merge key ("<<: *base") is meant, not a duplicate.
    raw = read_yaml_mapping(_write(tmp_path, "base: &b {k: 1, j: 2}\nrun:\n  <<: *b\n  k: 3\n"), "config", "")
    assert raw["run"] == {"k": 3, "j": 2}


@pytest.mark.parametrize(
    "overrides, limit",
    [(["preset=tiny", "block_size=100000"], 2048), (["preset=tiny", "block_size=2049"], 2048),
     (["block_size=8193"], 8192), (["preset=large", "block_size=9000"], 8192)],
)
def test_a_new_models_context_is_bounded(overrides, limit):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert f"choose 8 to {limit} tokens" in str(err.value), str(err.value)
    ok = [o for o in overrides if not o.startswith("block_size")] + [f"block_size={limit}"]
    assert load_config(None, ok).block_size == limit

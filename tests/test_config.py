"""Config composition, command-line overrides and the errors raised before any work."""

from pathlib import Path

import pytest

import sft_train
import stage
from training.attention import resolve_attention
from training.checks import validate
from training.config import MODEL_PRESETS, Config, ConfigError, load_config, save_config
from training.errors import UserError

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


def test_defaults_match_the_reference():
    c = Config()
    assert (c.seed, c.batch_size, c.eval_batch_size, c.gradient_accumulation_steps) == (0, 4, 16, 1)
    assert (c.lr, c.optimizer, c.warmup_steps, c.max_grad_norm) == (5e-7, "RMSprop", 150, 10.0)
    assert (c.max_length, c.max_prompt_length, c.n_epochs, c.n_examples) == (512, 256, 1, None)
    assert (c.n_eval_examples, c.eval_every, c.do_first_eval, c.sample_during_eval, c.n_eval_model_samples) == (256, 20000, True, True, 16)
    assert c.local_dirs == ["/scr-ssd", "/scr", ".cache"] and c.datasets == ["hh"] and c.minimum_log_interval_secs == 1.0
    assert (c.debug, c.wandb.enabled, c.wandb.entity, c.wandb.project) == (False, True, None, "direct-preference-optimization")
    assert c.loss.name == "sft" and c.model.policy_dtype == "float32" and c.model.reference_dtype == "float16"


def test_model_preset_from_command_line_like_the_reference():
    c = load_config(["model=pythia28", "datasets=[hh]", "exp_name=x"])
    assert c.model.name == "pythia28"
    assert c.model.name_or_path == "EleutherAI/pythia-2.8b" and c.model.block_name == "GPTNeoXLayer"
    assert c.model.tokenizer_name_or_path is None and c.model.fsdp_policy_mp is None and c.model.archive is None
    assert {k: v["block_name"] for k, v in MODEL_PRESETS.items()} == {
        "blank_model": None, "gpt2-large": "GPT2Block", "gpt2-xl": "GPT2Block", "gptj": "GPTJBlock",
        "llama7b": "LlamaDecoderLayer", "pythia28": "GPTNeoXLayer", "pythia69": "GPTNeoXLayer",
    }


def test_recipe_then_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("exp_name: a\nlr: 1.0e-5\nmodel:\n  name: llama7b\n  fsdp_policy_mp: bfloat16\ndatasets: [hh]\n")
    c = load_config([str(recipe), "lr=1e-6", "model.policy_dtype=bfloat16", "datasets=[hh,shp]", "n_examples=null", "wandb.enabled=false"])
    assert c.lr == 1e-6 and isinstance(c.lr, float)
    assert c.model.name_or_path == "huggyllama/llama-7b"  # preset kept
    assert c.model.fsdp_policy_mp == "bfloat16" and c.model.policy_dtype == "bfloat16"
    assert c.datasets == ["hh", "shp"] and c.n_examples is None and c.wandb.enabled is False
    # another model on the command line replaces the recipe's model section; model.* words apply on top, in any order
    c = load_config([str(recipe), "model=pythia28"])
    assert c.model.name_or_path == "EleutherAI/pythia-2.8b" and c.model.fsdp_policy_mp is None
    c = load_config([str(recipe), "model.fsdp_policy_mp=float16", "model=pythia28"])
    assert c.model.name == "pythia28" and c.model.fsdp_policy_mp == "float16"


def test_explicit_model_keys_beat_the_preset():
    c = load_config(["model=gpt2-xl", "model.name_or_path=/models/my-gpt2", "model.block_name=MyBlock"])
    assert (c.model.name_or_path, c.model.block_name) == ("/models/my-gpt2", "MyBlock")


@pytest.mark.parametrize("args", [
    ["model=recipes/demo", "model.policy_dtype=bfloat16"],
    ["model.policy_dtype=bfloat16", "model=recipes/demo"],
    ["recipes/demo_dpo.yaml", "model=recipes/demo", "model.policy_dtype=bfloat16", "model.archive=runs/x/LATEST/policy.pt"],
    ["recipes/demo.yaml", "model.policy_dtype=bfloat16", "model=someorg/some-model"],
    ["RECIPE", "model.policy_dtype=bfloat16"],  # the recipe says `model: someorg/some-model`
])
def test_a_model_directory_or_hub_id_takes_model_keys_in_any_order(args, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("exp_name: a\nmodel: someorg/some-model\n")
    c = load_config([str(recipe) if a == "RECIPE" else a for a in args])
    source = "someorg/some-model" if "model=someorg/some-model" in args or "RECIPE" in args else "recipes/demo"
    assert (c.model.name, c.model.name_or_path, c.model.policy_dtype) == ("blank_model", source, "bfloat16")
    assert c.model.random_init is False  # model=... replaced the recipe's model section
    if "recipes/demo_dpo.yaml" in args:
        assert c.model.archive == "runs/x/LATEST/policy.pt" and c.loss.name == "dpo"


@pytest.mark.parametrize("recipe", ["demo.yaml", "demo_dpo.yaml"])
def test_command_line_datasets_drop_the_recipe_files_of_the_datasets_it_no_longer_names(recipe, monkeypatch, caplog):
    monkeypatch.chdir(REPO)
    own = ["data_files.jsonl.train=mine/train.jsonl", "data_files.jsonl.test=mine/test.jsonl"]
    with caplog.at_level("INFO"):
        c = load_config([f"recipes/{recipe}", "datasets=[jsonl]", *own, "model.archive=null"])
    assert c.datasets == ["jsonl"] and c.data_files == {"jsonl": {"train": "mine/train.jsonl", "test": "mine/test.jsonl"}}
    validate(c, 1)
    (note,) = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert note == "datasets=[jsonl] on the command line: the recipe's data_files.hh no longer apply and are dropped"
    kept = load_config([f"recipes/{recipe}", "datasets=[hh,jsonl]", *own, "dataset_weights.jsonl=2"])
    assert set(kept.data_files) == {"hh", "jsonl"}
    # files the command line names for a dataset it does not list are still a mistake
    c = load_config([f"recipes/{recipe}", "datasets=[jsonl]", *own, "data_files.hh.train=x.jsonl", "model.archive=null"])
    with pytest.raises(ConfigError, match=r"data_files.hh: 'hh' is not in datasets=\['jsonl'\]"):
        validate(c, 1)


def test_command_line_datasets_drop_the_recipe_weights_of_the_datasets_it_no_longer_names(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("exp_name: a\ndatasets: [hh, shp]\ndataset_weights: {hh: 1.0, shp: 0.5}\n")
    assert load_config([str(recipe), "datasets=[shp]"]).dataset_weights == {"shp": 0.5}


def test_data_files_nested_overrides():
    c = load_config(["data_files.hh.train=a.jsonl", "data_files.hh.test=[b.jsonl,c.jsonl.gz]"])
    assert c.data_files == {"hh": {"train": "a.jsonl", "test": ["b.jsonl", "c.jsonl.gz"]}}


@pytest.mark.parametrize(
    "args, message",
    [
        (["lrr=1"], "unknown config key 'lrr' (did you mean 'lr'?)"),
        (["model.polcy_dtype=float32"], "unknown config key 'model.polcy_dtype' (did you mean 'model.policy_dtype'?)"),
        (["wandb.entiy=me"], "'wandb.entiy' (did you mean 'wandb.entity'?)"),
        (["batch_size=four"], "batch_size: expected an integer, got 'four'"),
        (["batch_size=2.5"], "batch_size: expected an integer"),
        (["lr=fast"], "lr: expected a number, got 'fast'"),
        (["do_first_eval=maybe"], "do_first_eval: expected true or false"),
        (["datasets={a: 1}"], "datasets: expected a list"),
        (["model=pythia_28"], "model: unknown model 'pythia_28' (did you mean 'pythia28'?)"),
    ],
)
def test_bad_keys_and_types_name_the_key(args, message):
    with pytest.raises(ConfigError) as e:
        load_config(args)
    assert message in str(e.value)


def valid(**over) -> list[str]:
    base = {"exp_name": "t", "model": "blank_model", "model.name_or_path": "recipes/demo", "wandb.enabled": "false"}
    base.update(over)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.mark.parametrize(
    "over, processes, message",
    [
        ({"model.name_or_path": "null"}, 1, "model.name_or_path is required with model=blank_model"),
        ({"exp_name": "null"}, 1, "exp_name is required"),
        ({"datasets": "[hh,shpp]"}, 1, "unknown dataset 'shpp' (did you mean 'shp'?)"),
        ({"batch_size": 6, "gradient_accumulation_steps": 4}, 1, "batch_size (6) must be divisible by gradient_accumulation_steps x processes (4 x 1 = 4)"),
        ({"batch_size": 8, "gradient_accumulation_steps": 2}, 3, "(2 x 3 = 6)"),
        ({"model.archive": "/nonexistent/policy.pt"}, 1, "model.archive: file not found: /nonexistent/policy.pt"),
        ({"optimizer": "Adamw"}, 1, "torch.optim has no 'Adamw' (did you mean 'AdamW'?)"),
        ({"n_epochs": "null", "n_examples": "null"}, 1, "set n_epochs or n_examples"),
        ({"max_prompt_length": 600}, 1, "max_prompt_length (600) must not exceed max_length (512)"),
        ({"model.policy_dtype": "fp16"}, 1, "model.policy_dtype: 'fp16' is not one of"),
        ({"loss.name": "dop"}, 1, "loss.name: 'dop' (did you mean 'dpo'?) is not one of sft, dpo, ipo"),
        ({"loss.name": "dpo"}, 1, "loss.beta is required with loss.name=dpo"),
        ({"loss.name": "ipo", "loss.beta": 0}, 1, "loss.beta must be positive, got 0.0"),
        ({"loss.name": "dpo", "loss.beta": 0.1, "loss.label_smoothing": 0.5}, 1, "loss.label_smoothing must be in [0, 0.5)"),
        ({"loss.name": "ipo", "loss.beta": 0.1, "loss.reference_free": "true"}, 1, "loss.reference_free applies to loss.name=dpo only"),
        ({"reference_logps": "cached"}, 1, "reference_logps: 'cached' must be `live` or `precompute`"),
        ({"data_files.shp.train": "x.jsonl"}, 1, "data_files.shp: 'shp' is not in datasets=['hh']"),
        ({"data_files.hh.tran": "x.jsonl"}, 1, "data_files.hh.tran: unknown split (did you mean 'data_files.hh.train'?)"),
        ({"resume_from": "/nonexistent/LATEST"}, 1, "resume_from: checkpoint directory not found"),
        ({"datasets": "[jsonl]"}, 1, "datasets=[jsonl] reads your own files and none are given for the train split: set "
                                     "data_files.jsonl.train=PATH and data_files.jsonl.test=PATH"),
        ({"datasets": "[hh,jsonl]", "data_files.jsonl.train": "x.jsonl"}, 1, "none are given for the test split"),
        ({"loss.name": "sigmoid", "loss.beta": 0.1}, 1, "loss.name: 'sigmoid' is TRL's name for it: use loss.name=dpo"),
    ],
)
def test_validation_errors(over, processes, message):
    config = load_config(valid(**over))
    with pytest.raises(ConfigError) as e:
        validate(config, processes)
    assert message in str(e.value)


def test_errors_stop_before_any_work(tmp_path, monkeypatch):
    """A bad config fails in main() before a tokenizer, data or model is loaded, and writes nothing."""
    calls = []
    monkeypatch.setattr(stage, "load_tokenizer", lambda *a, **k: calls.append("tokenizer"))
    monkeypatch.setattr(stage, "load_model", lambda *a, **k: calls.append("model"))
    monkeypatch.setattr(sft_train, "build_split", lambda *a, **k: calls.append("data"))
    run_dir = tmp_path / "run"
    for over in ({"model.archive": str(tmp_path / "missing.pt")}, {"datasets": "[hh,nope]"}, {"batch_size": 5, "gradient_accumulation_steps": 2},
                 {"loss.name": "dpo", "loss.beta": 0.1}, {"datasets": "[jsonl]", "max_length": 64, "max_prompt_length": 32}):
        with pytest.raises(UserError):  # ConfigError, or CheckpointError for the archive
            sft_train.main(valid(run_dir=run_dir, **over))
    with pytest.raises(ConfigError):
        sft_train.main(valid(run_dir=run_dir, lrr=1))
    assert calls == [] and not run_dir.exists()


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.name for r in RECIPES])
def test_every_recipe_parses_and_validates(recipe, monkeypatch):
    monkeypatch.chdir(REPO)
    config = load_config([str(recipe)])
    if config.model.archive and not Path(config.model.archive).is_file():
        assert config.model.archive.startswith("runs/"), "an archive a recipe names is the output of an earlier stage"
        config.model.archive = None  # made by running the earlier stage's recipe
    if config.model.name != "blank_model":
        assert config.model.block_name, "multi-GPU recipes need a block_name for FSDP wrapping"
    validate(config, 1)
    assert config.exp_name


def test_saved_config_loads_back_identically(tmp_path):
    config = load_config(valid(lr="2e-6", **{"datasets": "[hh,shp]", "data_files.hh": "a.jsonl"}))
    save_config(config, tmp_path / "config.yaml")
    assert load_config([str(tmp_path / "config.yaml")]) == config


def test_packing_picks_per_example_attention_unless_set():
    """Picked once the device is known (training/attention.py resolve_attention, called by start_run): on CPU sdpa_packed."""
    def resolved(args: list[str]) -> str | None:
        config = load_config(args)
        resolve_attention(config, "cpu")
        return config.model.attn_implementation

    assert load_config(["packing=true"]).model.attn_implementation is None  # not yet: the config does not know the device
    assert resolved(["packing=true"]) == "sdpa_packed"
    assert resolved(["packing=true", "model.attn_implementation=flash_attention_2"]) == "flash_attention_2"
    assert resolved([]) is None

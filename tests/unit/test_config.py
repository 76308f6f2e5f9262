"""Recipe loading: defaults inheritance, overrides, unknown keys, cross-field checks, every recipe."""
from __future__ import annotations

from pathlib import Path

import pytest

from stepwise.config import ConfigError, load_recipe
from stepwise.pipeline.runner import stage_names

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted(p for p in (REPO / "recipes").rglob("*.yaml") if "base" not in p.parts)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(f"defaults: [{REPO / 'recipes/base/tiny_arith.yaml'}]\n" + text)
    return path


def _fixture_for(recipe: Path) -> list[str]:
    """Cluster recipes name /models/<Name> (the policy, maybe the critic); on CI the published config.json stands in."""
    import yaml

    data = yaml.safe_load(recipe.read_text())
    overrides = []
    for key, path in (("model.path", (data.get("model") or {}).get("path")),
                      ("skywork_dapo.critic_init", (data.get("skywork_dapo") or {}).get("critic_init"))):
        if not path or Path(path).exists():
            continue
        fixture = REPO / "tests/fixtures/configs" / f"{Path(path).name}.json"
        assert fixture.is_file(), f"{recipe}: no fixture config for {path}"
        overrides.append(f"{key}={fixture}")
    return overrides


@pytest.mark.parametrize("recipe", RECIPES, ids=[str(p.relative_to(REPO)) for p in RECIPES])
def test_every_recipe_loads_and_names_its_stages(recipe):
    config = load_recipe(recipe, _fixture_for(recipe))
    assert config.run.dir.endswith(recipe.stem)
    assert stage_names(config)
    topology = f"{config.parallel.nnodes}n{config.parallel.nproc_per_node}g"
    assert recipe.parent.name == "tiny" or topology in recipe.stem, "topology belongs in the file name"


def test_defaults_are_inherited_and_recipe_overrides_them(tmp_path):
    config = load_recipe(write(tmp_path, "sft:\n  max_steps: 7\n"))
    assert config.sft.max_steps == 7
    assert config.model.hf_config["hidden_size"] == 128  # from the base file
    assert config.sft.optim.adam_eps == 1e-8  # from the schema


def test_command_line_overrides_win(tmp_path):
    config = load_recipe(write(tmp_path, ""), ["sft.optim.lr=0.5", "run.dir=/tmp/x"])
    assert config.sft.optim.lr == 0.5 and config.run.dir == "/tmp/x"


def test_unknown_key_names_file_line_key_and_closest_name(tmp_path):
    path = write(tmp_path, "sft:\n  optim:\n    warmup_fracton: 0.1\n")
    with pytest.raises(ConfigError) as error:
        load_recipe(path)
    message = str(error.value)
    assert f"{path}:4" in message
    assert "sft.optim.warmup_fracton" in message and "did you mean 'warmup_fraction'" in message


def test_unknown_override_key_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'sft\.optim\.lrr'; did you mean 'lr'"):
        load_recipe(write(tmp_path, ""), ["sft.optim.lrr=3"])


def test_wrong_type_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"sft\.max_steps"):
        load_recipe(write(tmp_path, ""), ["sft.max_steps=abc"])


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["parallel.tp=3"], "does not divide the world size"),
        (["parallel.tp=4", "parallel.nproc_per_node=4"], "does not divide num_key_value_heads=2"),
        (["parallel.pp=4", "parallel.tp=1", "parallel.nproc_per_node=4"], "does not divide num_hidden_layers=2"),
        (["sft.global_batch_size=48"], "not divisible by micro_batch_size x DP = 32 x 1"),
        (["parallel.tp=1", "sft.micro_batch_size=16", "sft.global_batch_size=48"], "not divisible by micro_batch_size x DP = 16 x 2"),
        (["sft.loss=dapo"], "unknown loss 'dapo'"),
        (["sft.loss_args.label_smooth=0.1"], "has no option 'label_smooth'"),
        (["model.dtype=fp8"], "model.dtype='fp8'"),
        (["model.fp8.recipe=mxfp4"], "model.fp8.recipe"),
        (["eval.split=train"], "eval.split"),
        (["eval.split=validation", "task.n_validation=0"], "eval.split=validation needs a validation split"),
        (["skywork_dapo.advantage_source=oracle"], "skywork_dapo.advantage_source"),
    ],
)
def test_cross_field_checks_fail_at_load(tmp_path, overrides, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(".", r"\.")):
        load_recipe(write(tmp_path, ""), overrides)


def test_missing_recipe_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="no such recipe file"):
        load_recipe(tmp_path / "nope.yaml")


def test_section_checks_surface_as_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="SamplingParams.temperature must be >= 0"):
        load_recipe(write(tmp_path, ""), ["sampling.params.temperature=-1"])


def test_a_section_layout_is_checked_against_the_model_it_trains():
    """The 72B recipe's critic (Qwen2.5-Math-7B: 28 heads, 4 KV heads) cannot run at the policy's TP 8."""
    recipe = REPO / "recipes/skywork_dapo/qwen2.5-72b-instruct_8n8g_tp8pp4.yaml"
    config = load_recipe(recipe, _fixture_for(recipe))
    assert (config.layout_for("critic").tp, config.layout_for("policy").tp) == (4, 8)
    with pytest.raises(ConfigError, match="critic.parallel.tp=8 does not divide num_attention_heads=28"):
        load_recipe(recipe, _fixture_for(recipe) + ["critic.parallel.tp=8"])


@pytest.mark.parametrize("overrides, fragment", [
    (["dqo_data.value_model=shared"], "dqo_data.value_model='shared' is not one of ['separate', 'head']"),
    (["policy.score_micro_batch_size=0"], "policy.score_micro_batch_size=0 must be >= 1"),
])
def test_value_model_and_scoring_settings_are_checked(tmp_path, overrides, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace("[", r"\[").replace(".", r"\.")):
        load_recipe(write(tmp_path, ""), overrides)


def test_a_separate_value_network_shares_the_policy_vocabulary_and_runs_at_its_layout():
    configs = REPO / "tests/fixtures/configs"
    recipe = REPO / "recipes/dqo/qwen2-7b-instruct_1n8g_tp4.yaml"
    math = load_recipe(recipe, _fixture_for(recipe) + [f"dqo_data.value_init={configs / 'Qwen2.5-Math-7B-Instruct.json'}"])
    assert math.dqo_data.value_model == "separate"
    with pytest.raises(ConfigError, match="vocab_size 128256 differs from the policy's 152064"):
        load_recipe(recipe, _fixture_for(recipe) + [f"dqo_data.value_init={configs / 'Llama-3.1-8B-Instruct.json'}"])
    tiny = REPO / "recipes/tiny/dqo_arith.yaml"
    with pytest.raises(ConfigError, match=r"dqo\.parallel \(value network\)\.tp=4 does not divide num_attention_heads=14"):
        load_recipe(tiny, [f"dqo_data.value_init={configs / 'Qwen2.5-0.5B-Instruct.json'}", "dqo.parallel.tp=4",
                           "dqo.parallel.nproc_per_node=4"])

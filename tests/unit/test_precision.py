"""Transformer implementation and FP8 choices on CPU: the switch, the GPU check, the sequence padding,
the recipe checks and scoring without FP8."""
from __future__ import annotations

from pathlib import Path

import pytest

from stepwise.config import ConfigError, load_recipe
from stepwise.config.schema import FP8Config, ModelConfig, ParallelConfig
from stepwise.models.precision import FP8_RECIPES, fp8_problem, fp8_sequence_multiple, resolve_transformer_impl
from stepwise.train.batches import LENGTH_MULTIPLE, length_multiple

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("choice, te_importable, cuda, expected", [
    ("auto", True, True, "te"), ("auto", True, False, "local"), ("auto", False, True, "local"),
    ("te", True, True, "te"), ("local", True, True, "local"), ("local", False, False, "local"),
])
def test_transformer_impl_resolves(choice, te_importable, cuda, expected):
    assert resolve_transformer_impl(choice, te_importable, cuda) == expected


@pytest.mark.parametrize("te_importable, cuda, missing", [(False, True, "transformer_engine is missing"),
                                                          (True, False, "CUDA is missing"),
                                                          (False, False, "transformer_engine and CUDA is missing")])
def test_te_without_te_or_cuda_is_an_error_naming_the_key(te_importable, cuda, missing):
    with pytest.raises(ValueError, match=f"model.transformer_impl=te .*{missing}"):
        resolve_transformer_impl("te", te_importable, cuda)


def test_te_on_this_machine_fails_when_the_model_is_built():
    from stepwise.models.builder import EngineOptions, build_gpt_model
    from stepwise.models.hf_config import arch_from_hf_dict

    arch = arch_from_hf_dict(dict(model_type="qwen2", vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                  num_attention_heads=4, num_key_value_heads=2, intermediate_size=64))
    with pytest.raises(ValueError, match="model.transformer_impl=te needs Transformer Engine"):
        build_gpt_model(arch, EngineOptions(transformer_impl="te"))
    with pytest.raises(ValueError, match="model.fp8.enabled=true needs Transformer Engine's layer spec"):
        build_gpt_model(arch, EngineOptions(fp8=True))


def test_fp8_recipes_are_megatrons():
    from megatron.core.enums import Fp8Recipe

    assert set(FP8_RECIPES) == {recipe.value for recipe in Fp8Recipe} - {"custom"}
    assert FP8Config().recipe == "tensorwise"


@pytest.mark.parametrize("capability, recipe, fragment", [
    ((8, 0), "tensorwise", "compute capability >= 8.9, this one is 8.0 (an A100 or older GPU trains in bf16"),
    ((8, 6), "delayed", "this one is 8.6"),
    ((8, 9), "blockwise", ">= 9.0, this one is 8.9 (use model.fp8.recipe=tensorwise)"),
    ((9, 0), "mxfp8", ">= 10.0, this one is 9.0"),
    ((12, 0), "mxfp8", "up to 12.0 (exclusive), this GPU is 12.0"),
    ((9, 0), "current", "model.fp8.recipe='current' is not one of"),
])
def test_fp8_is_refused_on_gpus_without_it(capability, recipe, fragment):
    assert fragment in fp8_problem(capability, recipe)


@pytest.mark.parametrize("capability, recipe", [((8, 9), "tensorwise"), ((9, 0), "delayed"), ((9, 0), "tensorwise"),
                                                ((9, 0), "blockwise"), ((10, 0), "mxfp8"), ((10, 0), "tensorwise")])
def test_fp8_runs_where_transformer_engine_supports_it(capability, recipe):
    assert fp8_problem(capability, recipe) is None


def test_fp8_sequence_multiple_is_megatrons_alignment_times_tp_under_sequence_parallelism():
    from megatron.core.enums import Fp8Recipe
    from megatron.core.fp8_utils import get_fp8_align_size

    for recipe in FP8_RECIPES:
        assert fp8_sequence_multiple(recipe, 1, True) == get_fp8_align_size(Fp8Recipe(recipe))
    assert (fp8_sequence_multiple("tensorwise", 4, True), fp8_sequence_multiple("tensorwise", 4, False)) == (64, 16)
    assert fp8_sequence_multiple("mxfp8", 2, True) == 64


def test_batches_pad_to_the_fp8_multiple_only_when_fp8_is_on():
    from stepwise.train.sft_data import SFTBatches

    parallel = ParallelConfig(tp=2, sequence_parallel=True)
    assert length_multiple(ModelConfig(), parallel) == LENGTH_MULTIPLE == 8
    fp8 = ModelConfig(fp8=FP8Config(enabled=True))
    assert length_multiple(fp8, parallel) == 32
    assert length_multiple(fp8, ParallelConfig(tp=2, sequence_parallel=False)) == 16
    batches = SFTBatches([{"ids": list(range(1, 12)), "mask": [1] * 11}], 0, 64, 1)  # 10 positions
    assert batches.micro_batches([0], 0, 1)[0]["input_ids"].shape[1] == 16
    batches.length_multiple = length_multiple(fp8, parallel)
    batch = batches.micro_batches([0], 0, 1)[0]
    assert batch["input_ids"].shape[1] == 32 and batch["loss_mask"][0, 10:].sum() == 0


def test_pair_batches_pad_alike():
    from stepwise.train.pair_data import PairBatches

    side = {"ids": list(range(1, 12)), "mask": [1] * 11}
    batches = PairBatches([{"chosen": side, "rejected": side, "ref_logp": (0.0, 0.0)}], 0, 64, 1)
    batches.length_multiple = 32
    assert batches.micro_batches([0], 0, 1)[0]["input_ids"].shape == (2, 32)


def test_scoring_runs_without_fp8_unless_the_recipe_says_so():
    from stepwise.train.engine import engine_options

    fp8 = ModelConfig(fp8=FP8Config(enabled=True))
    assert engine_options(fp8, ParallelConfig()).fp8 and not engine_options(fp8, ParallelConfig(), scoring=True).fp8
    both = ModelConfig(fp8=FP8Config(enabled=True, scoring=True))
    assert engine_options(both, ParallelConfig(), scoring=True).fp8
    assert engine_options(ModelConfig(transformer_impl="local"), ParallelConfig()).transformer_impl == "local"


@pytest.mark.parametrize("overrides, fragment", [
    (["model.transformer_impl=tensorrt"], "model.transformer_impl='tensorrt' is not one of ['auto', 'te', 'local']"),
    (["model.fp8.recipe=current"], "model.fp8.recipe='current' is not one of"),
    (["model.fp8.enabled=true", "model.transformer_impl=local"], "needs Transformer Engine: set model.transformer_impl=te"),
    (["model.fp8.enabled=true", "model.max_seq_len=48"],
     "model.max_seq_len=48 must be a multiple of 32 with FP8 (recipe 'tensorwise', parallel.tp=2, sequence parallel): use 64"),
    (["model.fp8.enabled=true", "model.max_seq_len=40", "parallel.sequence_parallel=false"],
     "must be a multiple of 16"),
    (["model.fp8.enabled=true", "model.fp8.recipe=mxfp8", "model.max_seq_len=48", "parallel.tp=1",
      "parallel.nproc_per_node=1", "sft.micro_batch_size=64"], "must be a multiple of 32 with FP8 (recipe 'mxfp8'"),
])
def test_recipe_checks_name_the_key(tmp_path, overrides, fragment):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"defaults: [{REPO / 'recipes/base/tiny_arith.yaml'}]\n")
    with pytest.raises(ConfigError) as error:
        load_recipe(recipe, overrides)
    assert fragment in str(error.value)


def test_an_fp8_recipe_with_a_fitting_length_loads(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"defaults: [{REPO / 'recipes/base/tiny_arith.yaml'}]\n")
    config = load_recipe(recipe, ["model.fp8.enabled=true", "model.transformer_impl=te"])
    assert (config.model.fp8.recipe, config.model.fp8.scoring, config.model.max_seq_len) == ("tensorwise", False, 64)

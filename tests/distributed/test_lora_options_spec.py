"""Job YAML: train.alpha and train.lora_targets reach the trainer; bad values are refused before anything runs."""
import typing
from pathlib import Path

import pytest

from blockskip_ray.distributed.jobspec import TrainSection, load_spec
from blockskip_ray.distributed.training import subject_train_spec
from blockskip_ray.method.lora import TARGET_CHOICES

DEMO = Path(__file__).resolve().parents[2] / "jobs" / "demo-tiny.yaml"


def test_targets_literal_matches_lora():
    hint = typing.get_type_hints(TrainSection)["lora_targets"]
    assert typing.get_args(hint) == TARGET_CHOICES


def test_alpha_and_targets_reach_the_optim_config():
    job = load_spec(DEMO, ["train.lora_targets=attn+ff", "train.alpha=8.0"])
    spec = subject_train_spec(job, "m", "s", "p", "", (1, 1), out="")
    assert spec.optim.targets == "attn+ff" and spec.optim.alpha == 8.0
    assert subject_train_spec(load_spec(DEMO), "m", "s", "p", "", (1, 1), out="").optim.targets == "attn"


def test_unknown_target_is_refused():
    with pytest.raises(ValueError, match="lora_targets"):
        load_spec(DEMO, ["train.lora_targets=ff"])

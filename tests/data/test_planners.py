"""The _cpu configuration added to the plans."""

from __future__ import annotations

from nnfiltermatch.data.planners import add_cpu_configuration


def test_cpu_configuration_keeps_patch_divisible() -> None:
    plans = {
        "configurations": {
            "2d": {
                "patch_size": [56, 40],
                "batch_size": 366,
                "architecture": {
                    "arch_kwargs": {
                        "n_stages": 4,
                        "features_per_stage": [32, 64, 128, 256],
                        "strides": [[1, 1], [2, 2], [2, 2], [2, 2]],
                        "kernel_sizes": [[3, 3]] * 4,
                        "n_conv_per_stage": [2] * 4,
                        "n_conv_per_stage_decoder": [2] * 3,
                    }
                },
            }
        }
    }
    name = add_cpu_configuration(plans, "2d")
    cpu = plans["configurations"][name]
    kwargs = cpu["architecture"]["arch_kwargs"]
    assert name == "2d_cpu" and kwargs["n_stages"] == 3 and kwargs["features_per_stage"] == [8, 16, 32]
    assert all(p % 4 == 0 for p in cpu["patch_size"]) and cpu["patch_size"] == [28, 20]
    assert len(kwargs["n_conv_per_stage_decoder"]) == 2

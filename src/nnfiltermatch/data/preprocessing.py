"""nnU-Net's preprocessor run on single cases, and on every case of a configuration into ``.partial`` folders.

Labelled cases are written as nnU-Net writes them; unlabelled ones with the same plan but without a label, into the
dataset's ``unlabeled/<data_identifier>/`` folder, so no blank label files and no second dataset are ever needed.
"""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from nnfiltermatch.data.inventory import Case, DatasetInventory
from nnfiltermatch.data.layout import PARTIAL_SUFFIX, preprocessed_root, unlabeled_folder
from nnfiltermatch.data.workers import run_parallel


def _preprocessing_context(plans: dict, configuration: str) -> tuple[Any, Any, Any]:
    """nnU-Net's plans and configuration managers and the configuration's preprocessor (built in each worker)."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans_manager = PlansManager(plans)
    configuration_manager = plans_manager.get_configuration(configuration)
    return plans_manager, configuration_manager, configuration_manager.preprocessor_class(verbose=False)


def preprocess_labeled_case(
    out_truncated: str, case: Case, plans: dict, configuration: str, dataset_json: dict
) -> None:
    """One labelled case through nnU-Net's preprocessor, saved as ``out_truncated`` + nnU-Net's own file endings."""
    plans_manager, configuration_manager, preprocessor = _preprocessing_context(plans, configuration)
    preprocessor.run_case_save(
        out_truncated,
        [str(p) for p in case.image_files],
        str(case.label_file),
        plans_manager,
        configuration_manager,
        dataset_json,
    )


def _preprocess_unlabeled_case(
    out_truncated: str, case: Case, plans: dict, configuration: str, dataset_json: dict
) -> None:
    """One unlabelled case: the image alone, compressed with nnU-Net's blosc2 settings, and its properties."""
    import blosc2
    from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params

    plans_manager, configuration_manager, preprocessor = _preprocessing_context(plans, configuration)
    data, _, properties = preprocessor.run_case(
        [str(p) for p in case.image_files], None, plans_manager, configuration_manager, dataset_json
    )
    data = np.ascontiguousarray(data, dtype=np.float32)
    blocks, chunks = comp_blosc2_params(data.shape, tuple(configuration_manager.patch_size), data.itemsize)
    blosc2.set_nthreads(1)
    blosc2.asarray(
        data,
        urlpath=out_truncated + ".b2nd",
        chunks=chunks,
        blocks=blocks,
        cparams={"codec": blosc2.Codec.LZ4HC, "clevel": 5, "nthreads": 1},
    )
    with open(out_truncated + ".pkl", "wb") as handle:
        pickle.dump(properties, handle)


def preprocess_configuration(
    inventory: DatasetInventory,
    dataset_name: str,
    plans: dict,
    configuration: str,
    dataset_json: dict,
    num_processes: int,
) -> list[tuple[Path, Path]]:
    """Preprocess labelled and unlabelled cases into ``.partial`` folders; returns (final, partial) pairs to install.

    The final folders are not touched here: a failure leaves them as they were (the caller removes the partials).
    """
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    data_identifier = PlansManager(plans).get_configuration(configuration).data_identifier
    targets = [
        (preprocessed_root(dataset_name) / data_identifier, inventory.labeled, preprocess_labeled_case, "labelled"),
        (
            unlabeled_folder(dataset_name, data_identifier),
            inventory.unlabeled,
            _preprocess_unlabeled_case,
            "unlabelled",
        ),
    ]
    folders = []
    for final, cases, fn, what in targets:
        final.parent.mkdir(parents=True, exist_ok=True)
        partial = final.with_name(final.name + PARTIAL_SUFFIX)
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir()
        folders.append((final, partial))
        jobs = [(str(partial / c.case_id), c, plans, configuration, dataset_json) for c in cases]
        run_parallel(fn, jobs, num_processes, f"{configuration}: preprocessing {what} cases")
    return folders

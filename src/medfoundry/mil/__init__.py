"""Multiple-instance learning on cached tile features: slide bags, MIL models, training, CV and heatmaps."""

from __future__ import annotations

from medfoundry.mil.data import Bag, BagSet, load_bags, read_bag_file
from medfoundry.mil.heatmap import attention_heatmap, save_heatmap
from medfoundry.mil.models import MIL_MODELS, AttentionMIL, MeanPoolMIL, MILOutput, TransMIL, create_mil_model
from medfoundry.mil.train import (
    MILCrossValidation,
    MILFit,
    MILPrediction,
    MILTaskConfig,
    MILTrainConfig,
    cross_validate_mil,
    patient_folds,
    predict_mil,
    train_mil,
)

__all__ = [
    "MIL_MODELS",
    "AttentionMIL",
    "Bag",
    "BagSet",
    "MILCrossValidation",
    "MILFit",
    "MILOutput",
    "MILPrediction",
    "MILTaskConfig",
    "MILTrainConfig",
    "MeanPoolMIL",
    "TransMIL",
    "attention_heatmap",
    "create_mil_model",
    "cross_validate_mil",
    "load_bags",
    "patient_folds",
    "predict_mil",
    "read_bag_file",
    "save_heatmap",
    "train_mil",
]

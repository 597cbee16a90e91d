"""The kinds of training stage (stt.stages.base.Stage), one file each; `STAGES` is the one registry of them.

Adding a stage: a file here with a Stage subclass, and its line in STAGES. stt.recipes names stages by these
keys; `stage_spec` resolves one into a StageSpec carrying its Stage object, which everything later asks.
"""

from stt.stages.base import NonFiniteStep, Stage, StageModel, ewc_regulariser, train_one_step
from stt.stages.spatial import SpatialStage, build_spatial
from stt.stages.spatiotemporal import SpatiotemporalStage, shared_trunk_student, spatiotemporal_loss
from stt.stages.temporal import TemporalStage, build_temporal, pass_levels, temporal_batch_loss
from stt.stages.vfs import VFSStage, build_vfs

STAGES: dict[str, type[Stage]] = {
    stage.name: stage for stage in (SpatialStage, TemporalStage, SpatiotemporalStage, VFSStage)
}

__all__ = [
    "STAGES",
    "NonFiniteStep",
    "Stage",
    "StageModel",
    "build_spatial",
    "build_temporal",
    "build_vfs",
    "ewc_regulariser",
    "pass_levels",
    "shared_trunk_student",
    "spatiotemporal_loss",
    "temporal_batch_loss",
    "train_one_step",
]

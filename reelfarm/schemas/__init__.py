"""What is asked: the film and campaign specs, the plan, and the manifest. No torch, no Ray."""

from reelfarm.schemas.campaign import Campaign, CampaignCell, MatrixValue, Schedule
from reelfarm.schemas.families import FAMILIES, FamilyRule
from reelfarm.schemas.film import (
    SPEC_VERSION,
    AnimaticModel,
    Camera,
    Character,
    DiffusersModel,
    Film,
    ModelSpec,
    Output,
    Scene,
    Shot,
    Transition,
    seconds_to_frames,
)
from reelfarm.schemas.loader import LoadedCampaign, load_campaign, load_film, load_spec
from reelfarm.schemas.manifest import MANIFEST_SCHEMA, ManifestRow
from reelfarm.schemas.plan import ChunkPlan, RenderPlan, ShotPlan

__all__ = [
    "FAMILIES",
    "MANIFEST_SCHEMA",
    "SPEC_VERSION",
    "AnimaticModel",
    "Camera",
    "Campaign",
    "CampaignCell",
    "Character",
    "ChunkPlan",
    "DiffusersModel",
    "FamilyRule",
    "Film",
    "LoadedCampaign",
    "ManifestRow",
    "MatrixValue",
    "ModelSpec",
    "Output",
    "RenderPlan",
    "Scene",
    "Schedule",
    "Shot",
    "ShotPlan",
    "Transition",
    "load_campaign",
    "load_film",
    "load_spec",
    "seconds_to_frames",
]

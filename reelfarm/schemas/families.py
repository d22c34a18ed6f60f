"""What each model family can render: frame rules, native clip length, size rules, cost.

Pure data. The planner and the spec checks read it; the backends obey the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ANIMATIC_VERSION", "FAMILIES", "FamilyRule", "family_for"]

# The animatic's drawing version: part of every animatic chunk's content key, so a change
# to how the animatic draws re-renders cached chunks. Bump it with any visible change.
ANIMATIC_VERSION = "1"


@dataclass(frozen=True)
class FamilyRule:
    """The limits of one model family.

    Attributes:
        name: family name used in specs (``wan``, ``ltx``...).
        step: frame counts must be ``step * k + 1`` (``1`` means any count).
        allowed: when set, the only frame counts the model was trained on.
        native_frames: the clip length the model was trained on, the default chunk length.
        min_frames: the shortest clip one call makes.
        max_frames: the longest chunk a spec may ask for (default ``native_frames``).
        size_multiple: width and height must be multiples of this.
        gpu_s_per_frame_mp_step: cost model, GPU-seconds per frame per megapixel per step
            on one H100-class GPU (published figures, see ``docs``), plus ``gpu_s_load``.
        gpu_s_fixed: fixed GPU-seconds per call (text encoder, VAE, scheduling).
        max_references: reference-to-video families: the most reference images (one per
            character of a shot) one call takes; None when the family takes no references.
    """

    name: str
    step: int
    native_frames: int
    min_frames: int
    size_multiple: int
    gpu_s_per_frame_mp_step: float
    gpu_s_fixed: float
    allowed: tuple[int, ...] | None = None
    default_steps: int = 30
    max_frames: int | None = None  # the longest chunk allowed (default: native_frames)
    max_references: int | None = None

    @property
    def longest(self) -> int:
        return self.max_frames or self.native_frames

    @property
    def rule(self) -> str:
        if self.allowed:
            return " or ".join(str(n) for n in self.allowed)
        return "any count" if self.step == 1 else f"{self.step}k+1"

    def accepts(self, frames: int) -> bool:
        if frames < self.min_frames:
            return False
        if self.allowed:
            return frames in self.allowed
        return (frames - 1) % self.step == 0

    def smallest_at_least(self, frames: int, cap: int) -> int:
        """The smallest valid clip length >= ``frames`` and <= ``cap`` (``cap`` if none)."""
        if self.allowed:
            fits = [n for n in self.allowed if frames <= n <= cap]
            return min(fits) if fits else cap
        n = max(frames, self.min_frames)
        n = ((n - 1 + self.step - 1) // self.step) * self.step + 1
        return min(n, cap)


FAMILIES: dict[str, FamilyRule] = {
    # The animatic draws frames directly: any length. Its native clip is short so
    # that even a small film exercises chunking, overlap and the farm.
    "animatic": FamilyRule("animatic", 1, 48, 1, 2, 0.03, 0.05, default_steps=1, max_frames=1024),
    # Wan 2.1 I2V 14B: ~5 min for 81 frames at 832x480, 40 steps on an H100 (notes 3.4).
    "wan": FamilyRule("wan", 4, 81, 5, 16, 0.23, 20.0, default_steps=40),
    # LTX-Video 2B: ~2 s for 121 frames at 768x512, 40 steps on an H100 (arXiv 2501.00103).
    "ltx": FamilyRule("ltx", 8, 121, 9, 32, 0.0011, 1.0, default_steps=40, max_frames=257),
    # CogVideoX-5B I2V: ~90 s for 49 frames at 720x480, 50 steps on an H100.
    "cogvideox": FamilyRule("cogvideox", 8, 49, 9, 16, 0.106, 5.0, default_steps=50),
    # Stable Video Diffusion (XT): trained on 14 (svd) or 25 (svd-xt) frames.
    "svd": FamilyRule("svd", 1, 25, 14, 8, 0.02, 2.0, allowed=(14, 25), default_steps=25),
    # Wan 2.1 VACE (1.3B and 14B) reference-to-video: Wan's 4k+1 frames and 16 px multiples;
    # costed as Wan 14B. Each reference is one more latent frame in every call; 3 subjects is
    # the most VACE's reference-to-video task shows, and the limit a shot may ask for.
    "wan_vace": FamilyRule("wan_vace", 4, 81, 5, 16, 0.23, 20.0, default_steps=30,
                           max_references=3),
}


def family_for(backend: str, family: str | None) -> FamilyRule:
    """The rule for a model spec: the animatic, or the named diffusers family."""
    return FAMILIES["animatic" if backend == "animatic" else str(family)]

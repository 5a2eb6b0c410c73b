"""What the reader knows about ComfyUI node types: the names of their widgets, in the
order the editor (UI) format stores them in ``widgets_values``, their link inputs and
output types (the exporter writes them), and the node types it refuses by family.

The widget order follows each node's INPUT_TYPES in ComfyUI (0.3.x) and the custom
packs named below; a seed widget is followed by the hidden ``control_after_generate``
value ("fixed", "randomize", ...), which the editor stores but the API format drops.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class NodeSpec:
    widgets: tuple[str, ...] = ()
    inputs: tuple[tuple[str, str], ...] = ()  # link inputs: (name, TYPE)
    outputs: tuple[str, ...] = ()  # output TYPEs, by slot


CONTROL = "control_after_generate"

SPECS: dict[str, NodeSpec] = {
    "UNETLoader": NodeSpec(("unet_name", "weight_dtype"), (), ("MODEL",)),
    "CLIPLoader": NodeSpec(("clip_name", "type", "device"), (), ("CLIP",)),
    "VAELoader": NodeSpec(("vae_name",), (), ("VAE",)),
    "LoraLoaderModelOnly": NodeSpec(("lora_name", "strength_model"), (("model", "MODEL"),), ("MODEL",)),
    "ModelSamplingSD3": NodeSpec(("shift",), (("model", "MODEL"),), ("MODEL",)),
    "CLIPTextEncode": NodeSpec(("text",), (("clip", "CLIP"),), ("CONDITIONING",)),
    "LoadImage": NodeSpec(("image", "upload"), (), ("IMAGE", "MASK")),
    "WanImageToVideo": NodeSpec(
        ("width", "height", "length", "batch_size"),
        (
            ("positive", "CONDITIONING"),
            ("negative", "CONDITIONING"),
            ("vae", "VAE"),
            ("clip_vision_output", "CLIP_VISION_OUTPUT"),
            ("start_image", "IMAGE"),
        ),
        ("CONDITIONING", "CONDITIONING", "LATENT"),
    ),  # fmt: skip
    "KSamplerAdvanced": NodeSpec(
        (
            "add_noise",
            "noise_seed",
            CONTROL,
            "steps",
            "cfg",
            "sampler_name",
            "scheduler",
            "start_at_step",
            "end_at_step",
            "return_with_leftover_noise",
        ),
        (("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("latent_image", "LATENT")),
        ("LATENT",),
    ),  # fmt: skip
    "KSampler": NodeSpec(
        ("seed", CONTROL, "steps", "cfg", "sampler_name", "scheduler", "denoise"),
        (("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("latent_image", "LATENT")),
        ("LATENT",),
    ),
    "VAEDecode": NodeSpec((), (("samples", "LATENT"), ("vae", "VAE")), ("IMAGE",)),
    "CreateVideo": NodeSpec(("fps",), (("images", "IMAGE"), ("audio", "AUDIO")), ("VIDEO",)),
    "SaveVideo": NodeSpec(("filename_prefix", "format", "codec"), (("video", "VIDEO"),), ()),
    "SaveAnimatedWEBP": NodeSpec(("filename_prefix", "fps", "lossless", "quality", "method"), (("images", "IMAGE"),)),
    # Video Helper Suite stores its widgets as a dict (name -> value); the names matter, not the order.
    "VHS_VideoCombine": NodeSpec(
        ("frame_rate", "loop_count", "filename_prefix", "format", "pingpong", "save_output"),
        (("images", "IMAGE"), ("audio", "AUDIO")),
    ),
    # ComfyUI-Frame-Interpolation (Fannovel16).
    "RIFE VFI": NodeSpec(
        ("ckpt_name", "clear_cache_after_n_frames", "multiplier", "fast_mode", "ensemble", "scale_factor"),
        (("frames", "IMAGE"),),
        ("IMAGE",),
    ),  # fmt: skip
    "FILM VFI": NodeSpec(("ckpt_name", "clear_cache_after_n_frames", "multiplier"), (("frames", "IMAGE"),), ("IMAGE",)),
    # Values.
    "PrimitiveInt": NodeSpec(("value", CONTROL), (), ("INT",)),
    "PrimitiveFloat": NodeSpec(("value",), (), ("FLOAT",)),
    "PrimitiveBoolean": NodeSpec(("value",), (), ("BOOLEAN",)),
    "PrimitiveString": NodeSpec(("value",), (), ("STRING",)),
    "PrimitiveStringMultiline": NodeSpec(("value",), (), ("STRING",)),
    "PrimitiveNode": NodeSpec(("value", CONTROL), (), ("*",)),  # the editor's legacy widget primitive
    # Math: ComfyUI-Custom-Scripts (pysssss) and ComfyUI_essentials (cubiq); outputs INT, FLOAT.
    "MathExpression|pysssss": NodeSpec(("expression",), (("a", "*"), ("b", "*"), ("c", "*")), ("INT", "FLOAT")),
    "SimpleMath+": NodeSpec(("value",), (("a", "*"), ("b", "*"), ("c", "*")), ("INT", "FLOAT")),
    # Switches: ComfyUI's core Switch (newer releases) and Crystools' "Switch any".
    "ComfySwitchNode": NodeSpec(("switch",), (("on_false", "*"), ("on_true", "*")), ("*",)),
    "Switch any [Crystools]": NodeSpec(("boolean",), (("on_true", "*"), ("on_false", "*")), ("*",)),
    "Reroute": NodeSpec((), (("", "*"),), ("*",)),
}

OUTPUTS = ("SaveVideo", "SaveAnimatedWEBP", "VHS_VideoCombine")
INTERPOLATORS = ("RIFE VFI", "FILM VFI")
PASSIVE = {"Note": "a note", "MarkdownNote": "a note", "PreviewImage": "a preview", "PreviewAny": "a preview",
           "SaveImage": "an image output (not a video)", "PreviewAudio": "a preview"}  # fmt: skip

# Node types that show the workflow is not a Wan 2.2 14B image-to-video render.
OTHER_FAMILY = {
    "Wan22ImageToVideoLatent": "the Wan 2.2 5B (TI2V) model",
    "EmptyHunyuanLatentVideo": "text-to-video (no start image)",
    "EmptyLatentImage": "an image model",
    "EmptySD3LatentImage": "an image model",
    "CheckpointLoaderSimple": "an image-model checkpoint",
    "WanFirstLastFrameToVideo": "first-last-frame video",
    "WanVaceToVideo": "Wan VACE",
    "WanFunInpaintToVideo": "Wan Fun inpainting",
    "WanSoundImageToVideo": "Wan S2V (sound to video)",
    "WanAnimateToVideo": "Wan Animate",
    "WanCameraImageToVideo": "Wan camera control",
}

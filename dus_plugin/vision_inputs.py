"""A prompt with an image for a multimodal model's forward pass, built from the model itself (no processor files).

The image is random pixels at the vision config's size. Families take it in a few shapes (one image tensor; with its
size; one tile per image; flattened patches with their grid, as Qwen-VL), so each shape is tried in turn: the first
that ``get_image_features`` accepts gives the number of image features, and the prompt holds that many image
tokens between a few text tokens (Kosmos-2 instead places its image embeddings where a mask over the prompt says).
``None`` when no shape fits the family: the caller feeds text only and says so.
"""

from __future__ import annotations

from typing import Any, Iterator

TOKEN_KEYS = ("image_token_id", "image_token_index", "video_token_index")


def _forward_params(model: Any) -> Any:
    """The parameters of the model's forward: which inputs the family takes, and which it requires."""
    import inspect

    return inspect.signature(model.forward).parameters


def needs_image(model: Any) -> bool:
    """The family's forward takes no text-only prompt: it needs pixel values (BLIP-2, InstructBLIP, Kosmos-2)."""
    import inspect

    if getattr(model, "main_input_name", "input_ids") == "pixel_values":  # Kosmos-2's pixel_values look optional
        return True
    params = _forward_params(model)
    return "pixel_values" in params and params["pixel_values"].default is inspect.Parameter.empty


def image_prompt(model: Any) -> dict[str, Any] | None:
    """Keyword arguments for ``model(**inputs)``: input_ids with image tokens and the image; None if none fits."""
    import torch

    params = _forward_params(model)
    if "image_embeds_position_mask" in params:
        return _position_mask_prompt(model)
    token = next((getattr(model.config, k) for k in TOKEN_KEYS if isinstance(getattr(model.config, k, None), int)), None)
    # a video family (InstructBLIP-Video) takes the image as a one-frame video
    features = getattr(model, "get_image_features", None) or getattr(model, "get_video_features", None)
    if token is None or features is None or getattr(model.config, "vision_config", None) is None:
        return None
    extra = _qformer_prompt(params)
    for image in _image_shapes(model.config):
        image.update(extra)
        try:
            with torch.no_grad():
                count = _feature_count(features(**image))
                ids = torch.tensor([[5, 6] + [token] * count + [7, 8, 9]])
                inputs = {"input_ids": ids, **image, **_token_types(params, ids, token)}
                model(**inputs, use_cache=False)
            return inputs
        except Exception:  # this family takes its image in another shape: try the next one
            continue
    return None


def _position_mask_prompt(model: Any) -> dict[str, Any] | None:
    """Kosmos-2 places its latent_query_num image embeddings where a mask over the prompt says, over any tokens."""
    import torch

    count = model.config.latent_query_num
    image = next(_image_shapes(model.config))
    inputs = {"input_ids": torch.tensor([[5, 6] + [7] * count + [8, 9]]), **image,
              "image_embeds_position_mask": torch.tensor([[0, 0] + [1] * count + [0, 0]])}
    try:
        with torch.no_grad():
            model(**inputs, use_cache=False)
    except Exception:  # not the layout this model takes: the caller feeds text only and says so
        return None
    return inputs


def _token_types(params: Any, ids: Any, token: int) -> dict[str, Any]:
    """Families with multimodal rotary positions (Qwen3-VL, GLM-4V, ...) take which tokens are image tokens too."""
    if "mm_token_type_ids" not in params:
        return {}
    return {"mm_token_type_ids": (ids == token).long()}


def _qformer_prompt(params: Any) -> dict[str, Any]:
    """InstructBLIP's Q-Former reads the instruction too, in its own (BERT) vocabulary."""
    import torch

    if "qformer_input_ids" not in params:
        return {}
    return {"qformer_input_ids": torch.tensor([[101, 7, 8, 102]])}


def _image_shapes(config: Any) -> Iterator[dict[str, Any]]:
    import torch

    vision = config.vision_config
    size = getattr(vision, "image_size", 28)
    size = size[0] if isinstance(size, (list, tuple)) else size if isinstance(size, int) else 28
    channels = getattr(vision, "num_channels", None) or 3
    pixels = torch.randn(1, channels, size, size, generator=torch.Generator().manual_seed(0))
    yield {"pixel_values": pixels}
    yield {"pixel_values": pixels, "image_sizes": torch.tensor([[size, size]])}
    yield {"pixel_values": pixels.unsqueeze(1)}
    if getattr(config, "image_grid_pinpoints", None):  # LLaVA-NeXT: the tiles of the best grid, and a thumbnail
        from transformers.image_processing_utils import select_best_resolution

        height, width = select_best_resolution((size, size), config.image_grid_pinpoints)
        tiles = pixels.expand(1 + (height // size) * (width // size), -1, -1, -1).unsqueeze(0)
        yield {"pixel_values": tiles, "image_sizes": torch.tensor([[size, size]])}
    patch = getattr(vision, "patch_size", 14)
    temporal = getattr(vision, "temporal_patch_size", 2)
    merge = getattr(vision, "spatial_merge_size", 2)
    flat = torch.randn(merge * merge, channels * temporal * patch * patch, generator=torch.Generator().manual_seed(0))
    yield {"pixel_values": flat, "image_grid_thw": torch.tensor([[1, merge, merge]])}


def _feature_count(features: Any) -> int:
    """How many image embeddings (one image token each) the vision tower returned."""
    if getattr(features, "pooler_output", None) is not None:
        features = features.pooler_output
    elif hasattr(features, "last_hidden_state"):
        features = features.last_hidden_state
    if isinstance(features, (list, tuple)):
        return sum(f.reshape(-1, f.shape[-1]).shape[0] for f in features)
    return features.reshape(-1, features.shape[-1]).shape[0]

"""A prompt with an image for a multimodal model's forward pass, built from the model itself (no processor files).

The image is random pixels at the vision config's size. Families take it in many shapes (one image tensor, with
or without its size; one tile per image; patches with their grid, mask, positions or row layout), and only the
shapes whose inputs the forward takes are tried, in turn: the first that ``get_image_features`` accepts gives the
number of image features, and the prompt holds that many image tokens between a few text tokens. Kosmos-2 instead
places its image embeddings where a mask over the prompt says (Kosmos-2.5 reads Pix2Struct's flattened patches), and
Mllama reads the image through cross-attention.
``None`` when no shape fits the family: the caller feeds text only and says so.
"""

from __future__ import annotations

from typing import Any, Iterator

TOKEN_KEYS = ("image_token_id", "image_token_index", "video_token_index")
IMAGE_KEYS = ("pixel_values", "flattened_patches")  # Kosmos-2.5 reads Pix2Struct's flattened patches


def image_key(inputs: dict[str, Any]) -> str | None:
    """Which of a prompt's inputs holds the image; None for a text prompt."""
    return next((k for k in IMAGE_KEYS if k in inputs), None)


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

    if _vision(model.config) is None:  # a text model
        return None
    params = _forward_params(model)
    if "image_embeds_position_mask" in params:
        return _position_mask_prompt(model, params)
    if "cross_attention_mask" in params:
        return _cross_attention_prompt(model)
    token = next((getattr(model.config, k) for k in TOKEN_KEYS if isinstance(getattr(model.config, k, None), int)), None)
    features = _features_fn(model)
    if token is None or features is None:
        return None
    extra = _qformer_prompt(params)
    for image in _image_shapes(model.config, params):
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


def _vision(config: Any) -> Any:
    """The image tower's config: a vision encoder's, or Emu3's VQ tokenizer's."""
    return getattr(config, "vision_config", None) or getattr(config, "vq_config", None)


def _features_fn(model: Any) -> Any:
    """The vision tower's entry point: on the model, or on its inner base model (DeepSeek-VL keeps it there only);
    a video family (InstructBLIP-Video) takes the image as a one-frame video."""
    for owner in (model, getattr(model, "model", None)):
        for name in ("get_image_features", "get_video_features"):
            if callable(getattr(owner, name, None)):
                return getattr(owner, name)
    return None


def _position_mask_prompt(model: Any, params: Any) -> dict[str, Any] | None:
    """Kosmos-2 places its latent_query_num image embeddings where a mask over the prompt says, over any tokens."""
    import torch

    count = model.config.latent_query_num
    image = _flattened_patches(model.config.vision_config) if "flattened_patches" in params else \
        next(_image_shapes(model.config, params))
    inputs = {"input_ids": torch.tensor([[5, 6] + [7] * count + [8, 9]]), **image,
              "image_embeds_position_mask": torch.tensor([[0, 0] + [1] * count + [0, 0]])}
    return _if_it_runs(model, inputs)


def _flattened_patches(vision: Any, side: int = 2) -> dict[str, Any]:
    """Kosmos-2.5 reads Pix2Struct's patches: each flattened after its row and column number (from 1; 0 pads)."""
    import torch

    rows, cols = torch.meshgrid(torch.arange(1, side + 1), torch.arange(1, side + 1), indexing="ij")
    pixels = torch.randn(1, side * side, vision.patch_embed_hidden_size, generator=torch.Generator().manual_seed(0))
    positions = torch.stack([rows, cols], -1).reshape(1, side * side, 2).float()
    return {"flattened_patches": torch.cat([positions, pixels], -1), "width": torch.tensor([28]),
            "height": torch.tensor([28])}


def other_image(inputs: dict[str, Any]) -> dict[str, Any]:
    """The same prompt with other random pixels (the patches' row and column numbers kept)."""
    import torch

    key = image_key(inputs)
    image = inputs[key]
    noise = torch.randn(image.shape, generator=torch.Generator().manual_seed(1)).to(image.dtype)
    if key == "flattened_patches":
        noise[..., :2] = image[..., :2]
    return {**inputs, key: noise}


def _cross_attention_prompt(model: Any) -> dict[str, Any] | None:
    """Mllama feeds the image through cross-attention layers: one image token, one tile of max_num_tiles, and a
    mask saying which tokens see which tiles (those after the image token see its first tile)."""
    import torch

    vision, token = model.config.vision_config, model.config.image_token_index
    tiles, size = vision.max_num_tiles, vision.image_size
    ids = torch.tensor([[5, token, 6, 7, 8]])
    cross = torch.zeros(1, ids.shape[1], 1, tiles, dtype=torch.long)
    cross[:, 1:, :, 0] = 1
    inputs = {"input_ids": ids, "cross_attention_mask": cross,
              "pixel_values": torch.randn(1, 1, tiles, vision.num_channels, size, size,
                                          generator=torch.Generator().manual_seed(0)),
              "aspect_ratio_ids": torch.tensor([[1]]),  # (1, 1): the first of supported_aspect_ratios
              "aspect_ratio_mask": torch.nn.functional.one_hot(torch.tensor([[0]]), tiles)}
    return _if_it_runs(model, inputs)


def _if_it_runs(model: Any, inputs: dict[str, Any]) -> dict[str, Any] | None:
    """The inputs, if the model's forward takes them; else None (the caller feeds text only and says so)."""
    import torch

    try:
        with torch.no_grad():
            model(**inputs, use_cache=False)
    except Exception:  # not the layout this model takes
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


def _image_shapes(config: Any, params: Any) -> Iterator[dict[str, Any]]:
    import torch

    vision = _vision(config)
    size = getattr(vision, "image_size", 28)
    size = size[0] if isinstance(size, (list, tuple)) else size if isinstance(size, int) else 28
    channels = getattr(vision, "num_channels", None) or 3
    pixels = torch.randn(1, channels, size, size, generator=torch.Generator().manual_seed(0))
    for image in ({"pixel_values": pixels}, {"pixel_values": pixels, "image_sizes": torch.tensor([[size, size]])}):
        yield {**image, **_high_res(config, params)}
    yield {"pixel_values": pixels.unsqueeze(1)}  # one tile per image
    if "pixel_attention_mask" in params:  # GraniteDocling says which tiles are real
        yield {"pixel_values": pixels.unsqueeze(1), "pixel_attention_mask": torch.ones(1, 1, dtype=torch.bool)}
    if getattr(config, "image_grid_pinpoints", None):  # LLaVA-NeXT: the tiles of the best grid, and a thumbnail
        from transformers.image_processing_utils import select_best_resolution

        height, width = select_best_resolution((size, size), config.image_grid_pinpoints)
        tiles = pixels.expand(1 + (height // size) * (width // size), -1, -1, -1).unsqueeze(0)
        yield {"pixel_values": tiles, "image_sizes": torch.tensor([[size, size]])}
    merge = _merge_size(config)
    for side in (merge, 2 * merge):
        yield from _patch_shapes(vision, params, side, merge, channels)


def _high_res(config: Any, params: Any) -> dict[str, Any]:
    """DeepSeek-VL-Hybrid reads the image twice: at its low-resolution tower's size and its SAM tower's."""
    import torch

    high = getattr(config, "high_res_vision_config", None)
    if "high_res_pixel_values" not in params or high is None:
        return {}
    size = high.image_size
    return {"high_res_pixel_values": torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))}


def _merge_size(config: Any) -> int:
    """How many patches a side the projector merges into one image token (2 where the family names none)."""
    for owner in (_vision(config), config):
        for key in ("spatial_merge_size", "merge_kernel_size", "pooling_kernel_size", "downsample_factor"):
            value = getattr(owner, key, None)
            value = value[0] if isinstance(value, (list, tuple)) else value
            if isinstance(value, int) and value > 0:
                return value
    return 2


def _patch_shapes(vision: Any, params: Any, side: int, merge: int, channels: int) -> Iterator[dict[str, Any]]:
    """An image already cut into side x side patches, in the layouts families take them (Qwen-VL flattens them
    with their grid; PaddleOCR-VL and Kimi keep each patch 2-D; Inkling keeps its frames; SigLIP 2 pads them with a
    mask; Gemma 4 gives each patch its position; MiniCPM-V lays them in a row; Molmo 2 names the patches each token
    pools)."""
    import torch

    patch = getattr(vision, "patch_size", 14)
    temporal = getattr(vision, "temporal_patch_size", 2)
    count, pixels = side * side, channels * patch * patch
    noise = torch.Generator().manual_seed(0)
    grid = {"image_grid_thw": torch.tensor([[1, side, side]])}
    if "image_merge_sizes" in params:  # VideoLLaMA 3 merges each image's patches by its own size
        grid["image_merge_sizes"] = torch.tensor([merge])
    yield {"pixel_values": torch.randn(count, pixels * temporal, generator=noise), **grid}
    yield {"pixel_values": torch.randn(count, pixels, generator=noise), **grid}
    yield {"pixel_values": torch.randn(count, channels, patch, patch, generator=noise), **grid}
    # Inkling: each patch a clip of frames, channels last, and no grid (one image token per patch)
    yield {"pixel_values": torch.randn(count, temporal, patch, patch, channels, generator=noise)}
    if "spatial_shapes" in params:
        yield {"pixel_values": torch.randn(1, count, pixels, generator=noise),
               "spatial_shapes": torch.tensor([[side, side]]),
               "pixel_attention_mask": torch.ones(1, count, dtype=torch.long)}
    if "image_position_ids" in params:  # Gemma 4 (its encoder-free variant takes merged patches)
        ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        positions = torch.stack([xs, ys], -1).reshape(1, count, 2)
        for width in {patch, getattr(vision, "model_patch_size", patch)}:
            yield {"pixel_values": torch.randn(1, count, channels * width * width, generator=noise),
                   "image_position_ids": positions}
    if "target_sizes" in params:
        yield {"pixel_values": torch.randn(1, channels, patch, patch * count, generator=noise),
               "target_sizes": torch.tensor([[side, side]])}
    if "image_token_pooling" in params:  # Molmo 2 pools merge x merge patches of one crop into each image token
        tokens = count // (merge * merge)
        yield {"pixel_values": torch.randn(1, count, pixels, generator=noise),
               "image_token_pooling": torch.arange(count).reshape(tokens, merge * merge),
               "image_grids": torch.tensor([[1, tokens, 0, 0]])}


def _feature_count(features: Any) -> int:
    """How many image embeddings (one image token each) the vision tower returned."""
    if getattr(features, "pooler_output", None) is not None:
        features = features.pooler_output
    elif getattr(features, "deepstack_features", None):  # Granite 4 Vision: (text layer, features) pairs, as long
        features = features.deepstack_features[0][1]
    elif hasattr(features, "last_hidden_state"):
        features = features.last_hidden_state
    if isinstance(features, (list, tuple)):
        return sum(f.reshape(-1, f.shape[-1]).shape[0] for f in features)
    return features.reshape(-1, features.shape[-1]).shape[0]

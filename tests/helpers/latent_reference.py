"""Reference COCONUT forward for the equality tests: recompute everything from scratch per latent.

Deliberately slow and independent of coconut.py: it uses the HF model's own full forward
(output_hidden_states) with no cache, filling latents one at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dataset import IGNORE_INDEX


def reference_embeds(model, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
    """Token embeddings with image features merged by the model's own code."""
    embeds = model.get_input_embeddings()(input_ids)
    if pixel_values is not None:
        cfg = model.config
        feats = model.model.get_image_features(
            pixel_values=pixel_values,
            vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        ).pooler_output
        mask = model.model.get_placeholder_mask(input_ids, inputs_embeds=embeds, image_features=feats)
        embeds = embeds.masked_scatter(mask, feats.to(embeds.dtype))
    return embeds


def reference_forward(
    model,
    latent_id: int,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    labels: torch.Tensor,
    pixel_values: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, logits) of COCONUT computed naively: n+1 full forwards for n latents."""
    embeds = reference_embeds(model, input_ids, pixel_values)
    latent_pos = [(ids == latent_id).nonzero().flatten().tolist() for ids in input_ids]
    n_max = max(len(p) for p in latent_pos)
    for i in range(n_max):
        hidden = model(
            inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, output_hidden_states=True
        ).hidden_states[-1]
        rows = []
        for b, positions in enumerate(latent_pos):
            row = embeds[b]
            if len(positions) > i:
                pos = positions[i]
                row = torch.cat([row[:pos], hidden[b, pos - 1 : pos], row[pos + 1 :]])
            rows.append(row)
        embeds = torch.stack(rows)
    logits = model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids).logits
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)
    return loss, logits

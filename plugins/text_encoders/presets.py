"""Architecture presets: the transformers config fields of the encoders FLUX and the seed use.

Plain dicts (no transformers import) so configs can report ``dim`` and ``minfm check``
can build the exact structure on the meta device without any file.
"""

from __future__ import annotations

_T5_V1_1 = dict(
    vocab_size=32128, d_kv=64, feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
    relative_attention_max_distance=128, layer_norm_epsilon=1e-6, tie_word_embeddings=False, dropout_rate=0.1,
)

#: T5 v1.1 encoders (google/t5-v1_1-*; FLUX's text_encoder_2 is t5-v1_1-xxl, as are flan-t5-xxl's shapes).
T5_PRESETS: dict[str, dict] = {
    "t5-v1_1-small": dict(_T5_V1_1, d_model=512, d_ff=1024, num_heads=6, num_layers=8),
    "t5-v1_1-base": dict(_T5_V1_1, d_model=768, d_ff=2048, num_heads=12, num_layers=12),
    "t5-v1_1-large": dict(_T5_V1_1, d_model=1024, d_ff=2816, num_heads=16, num_layers=24),
    "t5-v1_1-xl": dict(_T5_V1_1, d_model=2048, d_ff=5120, num_heads=32, num_layers=24),
    "t5-v1_1-xxl": dict(_T5_V1_1, d_model=4096, d_ff=10240, num_heads=64, num_layers=24),
}

_CLIP = dict(vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5)

#: CLIP text towers (openai/clip-vit-*; FLUX's text_encoder is clip-vit-large-patch14).
CLIP_PRESETS: dict[str, dict] = {
    "clip-vit-base-patch32": dict(_CLIP, hidden_size=512, intermediate_size=2048, num_attention_heads=8,
                                  num_hidden_layers=12, projection_dim=512),
    "clip-vit-large-patch14": dict(_CLIP, hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                   num_hidden_layers=12, projection_dim=768),
}

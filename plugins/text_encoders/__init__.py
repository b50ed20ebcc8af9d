"""Built-in plugin 'text_encoders': T5, CLIP, class-embedding tables and a small word vocabulary."""

from minfm_core import hookimpl

from .configs import ClassEmbeddingConfig, ClipEncoderConfig, T5EncoderConfig, VocabEncoderConfig


@hookimpl
def register_text_encoders(register):
    register("t5", "minfm_plugins.text_encoders.t5:build_t5", T5EncoderConfig)
    register("clip", "minfm_plugins.text_encoders.clip:build_clip", ClipEncoderConfig)
    register("class_embedding", "minfm_plugins.text_encoders.class_embedding:build_class_embedding", ClassEmbeddingConfig)
    register("vocab", "minfm_plugins.text_encoders.vocab:build_vocab", VocabEncoderConfig)

"""Tiny random-weight SD3 and SD3.5 pipelines of the real classes, at the sizes of diffusers' own SD3 tests.

Two departures from those tests, both so that the tiny model exercises what the real ones do: the VAE has four
levels (factor 8) and the transformer a patch size of 2, so image sides must be multiples of 16 as on SD3; and
the transformer has four blocks, so skip-layer guidance has layers to skip. The T5 tokenizer is built here (a
Unigram model over single characters, no hub, no sentencepiece), and the T5 encoder has dropout 0.
"""

from __future__ import annotations

import tempfile

import torch

INIT_SEED = 100
CLIP = {"hidden_size": 32, "intermediate_size": 37, "layer_norm_eps": 1e-05, "num_attention_heads": 4,
        "num_hidden_layers": 5, "hidden_act": "gelu", "projection_dim": 32}
T5 = {"d_model": 32, "d_ff": 37, "d_kv": 8, "num_heads": 4, "num_layers": 5, "relative_attention_num_buckets": 8}
T5_MAX_TOKENS = 512


def t5_tokenizer():
    """A T5 tokenizer (transformers' class, tokenizers backend): `<pad>` 0, `</s>` 1, `<unk>` 2, then each
    printable ASCII character with and without the word-start marker; `</s>` closes every text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5Tokenizer

    chars = [chr(c) for c in range(33, 127)]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + c, -3.0) for c in chars] + [(c, -4.0) for c in chars]
    backend = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                           special_tokens=[("</s>", 1)])
    tokenizer = T5Tokenizer(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                            extra_ids=0, model_max_length=T5_MAX_TOKENS)
    with tempfile.TemporaryDirectory() as tmp:  # what from_pretrained gives back, as the saved model will
        tokenizer.save_pretrained(tmp)
        return T5Tokenizer.from_pretrained(tmp)


def build_sd3_pipeline(sd35: bool = False):
    """A StableDiffusion3Pipeline; `sd35`: MMDiT-X blocks (a second, image-only attention in blocks 0 and 1) and
    RMS QK-normalisation, as SD3.5-medium."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from batchgen.models.tiny import clip_tokenizer

    torch.manual_seed(INIT_SEED)
    extra = {"dual_attention_layers": (0, 1), "qk_norm": "rms_norm"} if sd35 else {}
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=4, num_layers=4, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=T5["d_model"], pooled_projection_dim=2 * CLIP["projection_dim"],
        out_channels=4, **extra)
    encoders = []
    for n in range(2):
        torch.manual_seed(INIT_SEED + 1 + n)
        encoders.append(CLIPTextModelWithProjection(CLIPTextConfig(
            bos_token_id=512, eos_token_id=513, pad_token_id=513, vocab_size=514, max_position_embeddings=77, **CLIP)))
    tokenizer_3 = t5_tokenizer()
    torch.manual_seed(INIT_SEED + 3)
    text_encoder_3 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_3), dropout_rate=0.0, pad_token_id=0,
                                             eos_token_id=1, decoder_start_token_id=0, **T5)).eval()
    torch.manual_seed(INIT_SEED + 4)
    vae = AutoencoderKL(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4, 4, 4, 4), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4,
        norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
        scaling_factor=1.5035)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=encoders[0], tokenizer=clip_tokenizer(), text_encoder_2=encoders[1], tokenizer_2=clip_tokenizer(),
        text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)

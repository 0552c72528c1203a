"""Tiny random-weight image-text models built from a config on the default model's tokenizer, with their
image tokens added: Idefics3 (SmolVLM's family) and LLaVA. Their processors need only Pillow."""
from pathlib import Path

# A ChatML template that takes a turn's content as text or as a list of image and text parts.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for part in message['content'] %}{% if part['type'] == 'image' %}"
    "<image>{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MAX_POSITIONS = 4096


def _text_config(tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POSITIONS,
                       initializer_range=0.3, tie_word_embeddings=True, bos_token_id=None, eos_token_id=None)


def _save(model, processor, out: Path) -> Path:
    model.generation_config.eos_token_id = None  # like the tiny text model: always max_new_tokens
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def build_idefics3(default_model: Path, out: Path) -> Path:
    import torch
    from transformers import (
        AutoTokenizer,
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessor,
        Idefics3Processor,
    )

    tokenizer = AutoTokenizer.from_pretrained(default_model)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<fake_token_around_image>", "<image>",
                                                                "<end_of_utterance>"]})
    images = Idefics3ImageProcessor(size={"longest_edge": 64}, max_image_size={"longest_edge": 32},
                                    do_image_splitting=False)
    processor = Idefics3Processor(image_processor=images, tokenizer=tokenizer, image_seq_len=4,
                                  chat_template=CHAT_TEMPLATE)
    config = Idefics3Config(text_config=_text_config(tokenizer), scale_factor=2,
                            vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                           "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
                            image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    torch.manual_seed(0)
    return _save(Idefics3ForConditionalGeneration(config), processor, out)


def build_llava(default_model: Path, out: Path) -> Path:
    import torch
    from transformers import (
        AutoTokenizer,
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = AutoTokenizer.from_pretrained(default_model)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=8,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=CHAT_TEMPLATE)
    config = LlavaConfig(text_config=_text_config(tokenizer), vision_feature_layer=-1,
                         vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                        num_attention_heads=2, image_size=32, patch_size=8,
                                                        projection_dim=32),
                         image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    torch.manual_seed(0)
    return _save(LlavaForConditionalGeneration(config), processor, out)

"""The shared core against hand-computed expectations: tokens, attention recording, masks."""

import math

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

import diffuseg.attention
import diffuseg.backends.common
from diffuseg.attention import AttentionController, AttentionStore, ExplicitAttnProcessor, attention_control
from diffuseg.masks import (
    IGNORE_INDEX,
    adaptive_threshold,
    aggregate_resolutions,
    label_map,
    otsu_threshold,
    refine_with_self_attention,
    remove_small_components,
    thresholds,
)
from diffuseg.testing import build_clip_tokenizer, tiny_stable_diffusion
from diffuseg.tokens import ClassWordNotFoundError, token_weights, word_token_positions


@pytest.fixture(scope="module")
def tokenizer():
    return build_clip_tokenizer()


# ---------------------------------------------------------------- token lookup


def tokens_at(tokenizer, prompt, positions):
    ids = tokenizer(prompt).input_ids
    return [tokenizer.convert_ids_to_tokens(ids[p]) for p in positions]


def test_single_token_word_position(tokenizer):
    # <bos> a photo of a dog -> "dog" is token 5
    assert word_token_positions(tokenizer, "a photo of a dog", "dog") == [5]


def test_multi_token_word_covers_all_its_tokens(tokenizer):
    positions = word_token_positions(tokenizer, "a zebra on grass", "zebra")
    assert tokens_at(tokenizer, "a zebra on grass", positions) == ["z", "e", "b", "r", "a</w>"]


def test_repeated_word_and_case_and_punctuation(tokenizer):
    prompt = "A Dog, and another dog!"
    positions = word_token_positions(tokenizer, prompt, "DOG")
    assert tokens_at(tokenizer, prompt, positions) == ["dog</w>", "dog</w>"]


def test_whole_words_only(tokenizer):
    with pytest.raises(ClassWordNotFoundError, match="'cat'.*'two cats'"):
        word_token_positions(tokenizer, "two cats", "cat")


def test_multi_word_class_name(tokenizer):
    prompt = "a red  car in the street"
    positions = word_token_positions(tokenizer, prompt, "red car")
    assert tokens_at(tokenizer, prompt, positions) == ["red</w>", "car</w>"]


def test_word_after_token_limit_is_an_error(tokenizer):
    prompt = "a " * 80 + "dog"
    with pytest.raises(ClassWordNotFoundError, match="77-token limit"):
        word_token_positions(tokenizer, prompt, "dog")
    # An occurrence before the cut is kept, the one after it dropped.
    prompt = "a dog " + "a " * 80 + "dog"
    assert word_token_positions(tokenizer, prompt, "dog") == [2]


def test_token_weights_average_tokens_and_repeat_per_image(tokenizer):
    weights = token_weights(tokenizer, ["a zebra", "a dog and a cat"], [["zebra"], ["dog", "cat"]], num_images_per_prompt=2)
    assert weights.shape == (4, 77, 2)
    assert torch.allclose(weights[0, 2:7, 0], torch.full((5,), 0.2))
    assert weights[0].sum() == pytest.approx(1.0) and weights[0, :, 1].sum() == 0  # padding column
    assert torch.equal(weights[0], weights[1]) and torch.equal(weights[2], weights[3])
    assert weights[2, 2, 0] == 1 and weights[2, 5, 1] == 1


@pytest.mark.parametrize(
    "prompts, words, message",
    [
        (["a dog"], [[]], "class_names is empty"),
        (["a dog", "a cat"], [["dog"], []], "no class words given for the prompt .a cat."),
        (["a dog"], [["dog", "Dog"]], "duplicate"),
        (["a dog", "a cat"], [["dog"]], "2 prompts but 1"),
        (["a dog"], [[" "]], "non-empty"),
    ],
)
def test_token_weights_bad_input(tokenizer, prompts, words, message):
    with pytest.raises(ValueError, match=message):
        token_weights(tokenizer, prompts, words)


# ---------------------------------------------------------------- attention recording


def identity_attention(dim):
    attn = Attention(query_dim=dim, cross_attention_dim=dim, heads=1, dim_head=dim)
    with torch.no_grad():
        for linear in (attn.to_q, attn.to_k, attn.to_v, attn.to_out[0]):
            linear.weight.copy_(torch.eye(dim))
            if linear.bias is not None:
                linear.bias.zero_()
    return attn


def test_recorded_cross_attention_is_softmax_of_qk():
    torch.manual_seed(0)
    dim, h, w, keys = 8, 4, 4, 6
    query, key = torch.randn(1, h * w, dim), torch.randn(1, keys, dim)
    weights = torch.zeros(1, keys, 2)
    weights[0, 1, 0] = 1.0  # word 0 = token 1
    weights[0, 3:5, 1] = 0.5  # word 1 = mean of tokens 3 and 4
    store = AttentionStore(weights)
    store.latent_size = (h, w)
    attn = identity_attention(dim)
    attn.set_processor(ExplicitAttnProcessor(store, AttnProcessor2_0()))
    out = attn(query, encoder_hidden_states=key)

    expected = torch.softmax(query[0] @ key[0].T / math.sqrt(dim), dim=-1)  # (16, 6)
    maps = store.cross_attention()[(h, w)][0].reshape(2, h * w)
    assert torch.allclose(maps[0], expected[:, 1], atol=1e-6)
    assert torch.allclose(maps[1], expected[:, 3:5].mean(dim=1), atol=1e-6)
    # The layer's output is unchanged by recording: same as SDPA.
    reference = identity_attention(dim)
    assert torch.allclose(out, reference(query, encoder_hidden_states=key), atol=1e-5)


@pytest.mark.parametrize("min_slice", [0, None])
def test_probabilities_come_in_row_slices_that_cover_the_layer(monkeypatch, min_slice):
    # Many heads and keys for few channels: each slice holds at most the layer's input size,
    # so with no minimum slice this layer's 64 query rows arrive in several slices; with the
    # default minimum (1 MiB of probabilities) a layer this small is one slice.
    if min_slice is not None:
        monkeypatch.setattr(diffuseg.backends.common, "MIN_SLICE_ELEMENTS", min_slice)
    torch.manual_seed(0)
    dim, heads, h, w, keys = 8, 4, 8, 8, 40
    attn = Attention(query_dim=dim, cross_attention_dim=dim, heads=heads, dim_head=dim // heads)
    hidden, context = torch.randn(2, h * w, dim), torch.randn(2, keys, dim)
    weights = torch.zeros(1, keys, 1)
    weights[0, 7, 0] = 1.0
    store = AttentionStore(weights, self_attention_resolution=h)
    store.latent_size = (h, w)
    slices = []

    class Spy(AttentionController):
        def wants(self, kind, size):
            return True

        def __call__(self, kind, size, probs, queries):
            slices.append((kind, queries))
            return store(kind, size, probs, queries)

    spy = Spy()
    spy.latent_size = (h, w)
    with torch.no_grad():
        reference_cross = attn(hidden, encoder_hidden_states=context)
        reference_self = attn(hidden)
        attn.set_processor(ExplicitAttnProcessor(spy, AttnProcessor2_0()))
        assert torch.allclose(attn(hidden, encoder_hidden_states=context), reference_cross, atol=1e-5)
        assert torch.allclose(attn(hidden), reference_self, atol=1e-5)

        cross = [q for kind, q in slices if kind == "cross"]
        assert len(cross) > 1 if min_slice == 0 else len(cross) == 1
        assert [q.start for q in cross] == [0] + [q.stop for q in cross[:-1]] and cross[-1].stop == h * w
        # Reference probabilities of the conditional image (batch of 2 = guidance halves), mean of heads.
        q = attn.to_q(hidden[1]).view(h * w, heads, -1).transpose(0, 1)
        k = attn.to_k(context[1]).view(keys, heads, -1).transpose(0, 1)
        expected = torch.softmax(q @ k.transpose(1, 2) * attn.scale, dim=-1).mean(dim=0)
        assert torch.allclose(store.cross_attention()[(h, w)].flatten(), expected[:, 7], atol=1e-6)
        assert store.cross_counts[(h, w)] == 1
        k_self = attn.to_k(hidden[1]).view(h * w, heads, -1).transpose(0, 1)
        expected_self = torch.softmax(q @ k_self.transpose(1, 2) * attn.scale, dim=-1).mean(dim=0)
        assert torch.allclose(store.self_attention()[0], expected_self, atol=1e-6)
        assert store.self_count == 1


class KeepEverything(AttentionController):
    """Prompt-to-prompt style: a list of every map of every step, for checking running means."""

    def __init__(self, store):
        super().__init__()
        self.store, self.maps = store, []

    def begin_unet_call(self, sample):
        super().begin_unet_call(sample)
        self.store.begin_unet_call(sample)

    def wants(self, kind, size):
        return self.store.wants(kind, size)

    def __call__(self, kind, size, probs, queries):
        if kind == "cross":
            if queries.start == 0:
                self.maps.append((size, probs.clone()))
            else:  # the layer's next slice of query rows
                self.maps[-1] = (size, torch.cat([self.maps[-1][1], probs], dim=2))
        return self.store(kind, size, probs, queries)


@pytest.fixture(scope="module")
def pipe():
    from diffuseg.pipelines import DiffuMaskPipeline

    return tiny_stable_diffusion(pipeline_class=DiffuMaskPipeline, seed=0)


def test_running_mean_equals_mean_of_stored_maps(pipe, tokenizer):
    weights = token_weights(tokenizer, ["a photo of a dog"], [["dog"]])
    store = AttentionStore(weights, steps=(1, 3))
    keeper = KeepEverything(store)
    with attention_control(pipe.unet, keeper):
        pipe("a photo of a dog", class_names=["dog"], num_inference_steps=3, height=32, width=32)
    assert store.step == 2  # three UNet evaluations seen, the first not recorded
    for size, mean in store.cross_attention().items():
        stored = [p for s, p in keeper.maps if s == size]
        # Guided batch: keep the conditional half, average heads, pick the token.
        reference = torch.stack([p[1:].mean(dim=1)[..., 5] for p in stored]).mean(dim=0)
        assert len(stored) == 2 * 2  # 2 recorded steps x 2 transformer layers at this size (down + up)
        assert torch.allclose(mean.flatten(), reference.flatten(), atol=1e-6)


def test_processors_restored_after_success_and_error(pipe):
    before = {name: type(p) for name, p in pipe.unet.attn_processors.items()}
    pipe("a dog", class_names=["dog"], num_inference_steps=1, height=32, width=32)
    assert {name: type(p) for name, p in pipe.unet.attn_processors.items()} == before

    def boom(*args, **kwargs):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        pipe("a dog", class_names=["dog"], num_inference_steps=2, height=32, width=32, callback_on_step_end=boom)
    assert {name: type(p) for name, p in pipe.unet.attn_processors.items()} == before
    assert "encode_prompt" not in vars(pipe)


def test_capture_one_liner_on_plain_sd_pipeline():
    import diffuseg

    sd = tiny_stable_diffusion(seed=1)
    with diffuseg.capture(sd, words=["dog", "grass"]) as maps:
        sd(["a dog on grass", "grass and a dog"], num_inference_steps=2, height=32, width=32, num_images_per_prompt=2)
    assert maps["dog"].shape == (4, 32, 32)
    assert maps.aggregate().shape == (4, 2, 32, 32)
    assert set(maps.per_resolution()) == {(16, 16), (8, 8)}
    assert float(maps["grass"].amax()) == pytest.approx(1.0)


# ---------------------------------------------------------------- masks


def test_aggregate_resolutions_upsamples_normalises_and_averages():
    coarse = torch.tensor([[[[1.0, 3.0], [0.0, 2.0]]]])
    fine = torch.full((1, 1, 4, 4), 5.0)
    out = aggregate_resolutions([coarse, fine], (4, 4))
    assert out.shape == (1, 1, 4, 4)
    # fine normalises to 1 everywhere; coarse's top-right corner holds its max (3 / 3 = 1).
    assert out[0, 0, 0, 3] == pytest.approx(1.0)
    assert out[0, 0, 3, 0] == pytest.approx(0.5)


def test_otsu_separates_bimodal_map():
    generator = torch.Generator().manual_seed(0)
    low = 0.2 + 0.05 * torch.randn(600, generator=generator)
    high = 0.8 + 0.05 * torch.randn(400, generator=generator)
    values = torch.cat([low, high]).reshape(1, 25, 40)
    t = float(otsu_threshold(values))
    assert 0.4 < t < 0.6
    assert int((values > t).sum()) == 400


def test_adaptive_threshold_stays_in_window():
    values = torch.cat([torch.full((50,), 0.1), torch.full((50,), 0.9)]).reshape(1, 10, 10)
    t = float(adaptive_threshold(values))
    assert 0.45 <= t <= 0.53
    flat = torch.full((1, 4, 4), 0.2)
    assert float(adaptive_threshold(flat)) == pytest.approx(0.49)


def test_unknown_threshold_method():
    with pytest.raises(ValueError, match="unknown threshold method 'mean'"):
        thresholds(torch.zeros(1, 2, 2), "mean")


def test_label_map_overlaps_go_to_the_strongest_class():
    maps = torch.tensor(
        [
            [[0.9, 0.9, 0.1], [0.1, 0.1, 0.1]],  # class 1
            [[0.1, 0.95, 0.8], [0.1, 0.1, 0.1]],  # class 2
        ]
    )
    labels = label_map(maps, torch.tensor([0.5, 0.5]))
    assert labels.tolist() == [[1, 2, 2], [0, 0, 0]]
    assert labels.dtype == np.uint8


def test_ignore_band_marks_uncertain_pixels():
    maps = torch.tensor([[[0.9, 0.52, 0.47, 0.1]]])
    labels = label_map(maps, torch.tensor([0.5]), ignore_band=0.05)
    assert labels.tolist() == [[1, IGNORE_INDEX, IGNORE_INDEX, 0]]


def test_padding_classes_are_ignored_and_small_components_dropped():
    maps = torch.zeros(2, 8, 8)
    maps[0, :4, :4] = 1.0  # 16-pixel component
    maps[0, 7, 7] = 1.0  # 1-pixel speck
    maps[1] = 1.0  # padding map: would win everywhere if used
    labels = label_map(maps, torch.tensor([0.5, 0.5]), min_area=4, num_classes=1)
    assert (labels[:4, :4] == 1).all() and labels[7, 7] == 0 and labels.sum() == 16


def test_remove_small_components_uses_8_connectivity():
    mask = np.zeros((5, 5), bool)
    mask[0, 0] = mask[1, 1] = mask[2, 2] = True  # diagonal chain: one component of 3
    mask[4, 4] = True
    assert remove_small_components(mask, 3).sum() == 3


def test_self_attention_refinement_spreads_along_affinity():
    # Pixels 0-1 attend to each other, as do 2-3: the map spreads inside each pair only.
    affinity = torch.tensor([[0.5, 0.5, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5], [0, 0, 0.5, 0.5]])
    maps = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    refined = refine_with_self_attention(maps, affinity[None], (2, 2))
    assert refined.flatten().tolist() == pytest.approx([1.0, 1.0, 0.0, 0.0])

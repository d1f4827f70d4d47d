"""PAUP: pooling geometry, closed-form causal pooling, no leakage from the future or padding, training,
scoring shapes, RecBole registration and one tiny end-to-end run on ml-100k (bundled with RecBole)."""

import pytest
import torch
import torch.nn.functional as F

import recbole_llm  # noqa: F401  (registers PAUP with RecBole)
from recbole_llm.paup.model import PAUP, CausalDownConv, segment_geometry

torch.set_num_threads(1)

TINY = dict(n_layers=2, n_heads=2, hidden_size=16, inner_size=32, channel_reduction=4,
            hidden_dropout_prob=0.0, attn_dropout_prob=0.0, seed=7)


class _FakeDataset:
    """Just what SequentialRecommender.__init__ reads: the item count."""

    def __init__(self, n_items):
        self.n_items = n_items

    def num(self, field):
        return self.n_items


def tiny_paup(max_len, kernel_size, seg_num, n_items=30, cls=PAUP, **overrides):
    from recbole_llm.core.config import Config

    config_dict = dict(TINY, MAX_ITEM_LIST_LENGTH=max_len, kernel_size=kernel_size, seg_num=seg_num,
                       device="cpu", **overrides)
    config = Config(model="PAUP", dataset="ml-100k", config_dict=config_dict, cmd_args=[])
    torch.manual_seed(0)
    model = cls(config, _FakeDataset(n_items))
    # non-zero biases so "zeroed" inputs are not trivially zero downstream
    for module in model.modules():
        if isinstance(module, (torch.nn.Conv1d, torch.nn.Linear)) and module.bias is not None:
            torch.nn.init.normal_(module.bias, std=0.1)
    return model.eval()


def right_padded(lengths, max_len, n_items=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    seq = torch.zeros(len(lengths), max_len, dtype=torch.long)
    for row, length in enumerate(lengths):
        seq[row, :length] = torch.randint(1, n_items, (length,), generator=g)
    return seq, torch.tensor(lengths)


def test_defaults_geometry_and_yaml():
    from recbole_llm.core.config import Config

    config = Config(model="PAUP", dataset="ml-100k", config_dict={"MAX_ITEM_LIST_LENGTH": 50}, cmd_args=[])
    assert (config["seg_num"], config["kernel_size"], config["n_layers"], config["n_heads"]) == (4, 5, 2, 2)
    assert (config["hidden_size"], config["inner_size"], config["loss_type"]) == (64, 256, "CE")
    # n=50, k1=10: 5 first-level blocks, k2=ceil(5/4)=2, segments of 20 positions
    assert segment_geometry(50, 10, 4) == (5, 2)
    pool = CausalDownConv(50, 64, 4, 10, 16)
    full, current = pool(torch.randn(2, 50, 64))
    assert full.shape == (2, 4, 64) and current.shape == (2, 50, 64)


@pytest.mark.parametrize("max_len,kernel_size,seg_num,message", [
    (20, 10, 4, "seg_num"), (8, 10, 1, "kernel_size"), (50, 0, 4, "kernel_size"),
])
def test_impossible_geometry_raises_naming_the_key(max_len, kernel_size, seg_num, message):
    with pytest.raises(ValueError, match=message):
        tiny_paup(max_len, kernel_size, seg_num)


@pytest.mark.parametrize("max_len,kernel_size,seg_num", [(50, 10, 4), (20, 5, 4), (13, 3, 2), (7, 2, 3)])
def test_causal_pooling_matches_convolutions_on_each_prefix(max_len, kernel_size, seg_num):
    """``current[t]`` is segment t // span of the two real convolutions run on x with positions > t zeroed."""
    torch.manual_seed(1)
    pool = CausalDownConv(max_len, 16, seg_num, kernel_size, 4)
    torch.nn.init.normal_(pool.conv1.bias)
    torch.nn.init.normal_(pool.conv2.bias)
    x = torch.randn(3, max_len, 16)
    padded_len = pool.m * pool.k2 * kernel_size

    def convs(inp):
        inp = F.pad(inp, (0, 0, 0, padded_len - max_len)).transpose(1, 2)
        return pool.conv2(torch.relu(pool.conv1(inp))).transpose(1, 2)

    full, current = pool(x)
    assert full.shape == (3, seg_num, 16)
    torch.testing.assert_close(full, convs(x), atol=1e-5, rtol=1e-5)
    for t in range(max_len):
        prefix = x.clone()
        prefix[:, t + 1:] = 0
        torch.testing.assert_close(current[:, t], convs(prefix)[:, t // pool.segment_span], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("max_len,kernel_size,seg_num", [(50, 10, 4), (20, 5, 4), (9, 3, 2)])
def test_shapes(max_len, kernel_size, seg_num):
    model = tiny_paup(max_len, kernel_size, seg_num)
    seq, lengths = right_padded([max_len, 1, max_len // 2], max_len)
    assert model.sequence_output(seq, lengths).shape == (3, max_len, 16)
    assert model(seq, lengths).shape == (3, 16)
    scores = model.full_sort_predict({model.ITEM_SEQ: seq, model.ITEM_SEQ_LEN: lengths})
    assert scores.shape == (3, 30)
    point = model.predict({model.ITEM_SEQ: seq, model.ITEM_SEQ_LEN: lengths, model.ITEM_ID: torch.tensor([1, 2, 3])})
    assert point.shape == (3,)


@pytest.mark.parametrize("max_len,kernel_size,seg_num", [(20, 3, 3), (12, 2, 2)])
def test_future_items_and_padding_never_change_a_real_position(max_len, kernel_size, seg_num):
    model = tiny_paup(max_len, kernel_size, seg_num)
    seq, lengths = right_padded([max_len, 11, 5], max_len)
    base = model.sequence_output(seq, lengths)
    g = torch.Generator().manual_seed(3)
    for t in range(max_len - 1):
        changed = seq.clone()
        # new items after t (including where there was padding) ...
        changed[:, t + 1:] = torch.randint(1, 30, changed[:, t + 1:].shape, generator=g)
        out = model.sequence_output(changed, lengths)
        torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], atol=1e-5, rtol=1e-5)
        # ... and the future turned into padding
        cut = seq.clone()
        cut[:, t + 1:] = 0
        out = model.sequence_output(cut, torch.clamp(lengths, max=t + 1))
        torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], atol=1e-5, rtol=1e-5)
    # the check has teeth: an earlier item does change later positions
    earlier = seq.clone()
    earlier[0, 0] = earlier[0, 0] % 29 + 1
    assert not torch.allclose(model.sequence_output(earlier, lengths)[0, 1:], base[0, 1:], atol=1e-4)
    # readout is the last real position
    torch.testing.assert_close(model(seq, lengths), base[torch.arange(3), lengths - 1])


def test_training_steps_reduce_loss():
    model = tiny_paup(12, 3, 2).train()
    seq, lengths = right_padded([12, 8, 5, 3, 10, 12, 7, 2], 12, seed=5)
    batch = {model.ITEM_SEQ: seq, model.ITEM_SEQ_LEN: lengths, model.POS_ITEM_ID: torch.arange(1, 9)}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        optimizer.zero_grad()
        loss = model.calculate_loss(batch)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_bpr_loss_runs():
    model = tiny_paup(12, 3, 2, loss_type="BPR").train()
    seq, lengths = right_padded([12, 4], 12)
    batch = {model.ITEM_SEQ: seq, model.ITEM_SEQ_LEN: lengths,
             model.POS_ITEM_ID: torch.tensor([1, 2]), model.NEG_ITEM_ID: torch.tensor([3, 4])}
    loss = model.calculate_loss(batch)
    loss.backward()
    assert torch.isfinite(loss)


def test_embed_items_is_the_extension_point():
    class Shifted(PAUP):
        def embed_items(self, item_seq):
            return super().embed_items(item_seq) + 1.0

    seq, lengths = right_padded([12, 4], 12)
    base = tiny_paup(12, 3, 2)(seq, lengths)
    shifted = tiny_paup(12, 3, 2, cls=Shifted)  # same seed, same weights, only embed_items differs
    assert not torch.allclose(shifted(seq, lengths), base)


def test_recbole_get_model_finds_paup():
    from recbole.utils import get_model

    assert get_model("PAUP") is PAUP


def test_run_recbole_llm_on_ml100k(tmp_path):
    from recbole_llm.run.quick_start import run_recbole_llm

    config_dict = dict(TINY, MAX_ITEM_LIST_LENGTH=10, kernel_size=5, seg_num=2, epochs=1, train_batch_size=1024,
                       eval_batch_size=4096, show_progress=False, checkpoint_dir=str(tmp_path / "saved"),
                       user_inter_num_interval="[250,inf)", item_inter_num_interval="[5,inf)")
    result = run_recbole_llm("PAUP", "ml-100k", config_dict=config_dict, cmd_args=[])
    assert set(result["test_result"]) >= {"recall@10", "ndcg@10", "mrr@10"}
    assert 0.0 <= result["test_result"]["ndcg@10"] <= 1.0


@pytest.mark.parametrize("model", ["PAUP", "PAUPSeRALM"])
@pytest.mark.parametrize("dataset", ["amazon-scientific", "ml-100k"])
def test_default_geometry_fits_the_bundled_dataset_yamls(model, dataset):
    from recbole_llm.core.config import Config
    from recbole_llm.core.locate import dataset_yaml
    from recbole_llm.paup.model import segment_geometry

    config = Config(model=model, dataset=dataset, config_file_list=[dataset_yaml(dataset)], cmd_args=[])
    segment_geometry(config["MAX_ITEM_LIST_LENGTH"], config["kernel_size"], config["seg_num"])  # raises if not


def test_positional_scores_are_scaled_as_the_reference_code_unless_asked(tmp_path):
    """Reference code: queries * (2 d)^-1/2, then scores / sqrt(d); ``single`` keeps only the first factor."""
    from recbole_llm.paup.model import ProgressiveUnsymmetricalAttention

    args = (2, 16, 10, 2, 5, 4, 0.0, 0.0, 1e-12)
    official = ProgressiveUnsymmetricalAttention(*args)
    single = ProgressiveUnsymmetricalAttention(*args, pos_score_scaling="single")
    d = 8
    assert official.pos_scaling == pytest.approx((2 * d) ** -0.5 * d ** -0.5)
    assert single.pos_scaling == pytest.approx((2 * d) ** -0.5)

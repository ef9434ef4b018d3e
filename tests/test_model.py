"""Model shapes, the token layout, and why padding needs no packing."""
import torch

from model import IGNORE_INDEX, DeepLog


def test_forward_shapes_and_token_layout():
    model = DeepLog(vocab_size=10, embedding_dim=8, hidden_size=12, num_layers=2, dropout=0.1)
    assert (model.end_id, model.pad_id, model.start_id, model.unk_id) == (10, 11, 12, 13)
    logits = model(torch.randint(0, 10, (3, 5)))
    assert logits.shape == (3, 5, 11)   # every event plus end-of-session


def test_right_padding_does_not_change_real_positions():
    torch.manual_seed(0)
    model = DeepLog(vocab_size=10, embedding_dim=8, hidden_size=12, num_layers=2).eval()
    alone = model(torch.tensor([[12, 1, 2, 3]]))
    padded = model(torch.tensor([[12, 1, 2, 3, 11, 11], [12, 4, 5, 6, 7, 8]]))
    assert torch.allclose(alone[0], padded[0, :4], atol=1e-6)


def test_encode_adds_start_and_end_and_maps_unknown_ids():
    model = DeepLog(vocab_size=10, embedding_dim=4, hidden_size=4, num_layers=1)
    inputs, targets = model.encode([[3, 4], [5, 42, 6]])
    assert inputs.tolist() == [[12, 3, 4, 11], [12, 5, 13, 6]]
    assert targets.tolist() == [[3, 4, 10, IGNORE_INDEX], [5, 13, 6, 10]]   # 42 is unknown, never "end"
    # a padded 2-D tensor (padding -1) and a 1-D sequence give the same encoding
    assert model.encode(torch.tensor([[3, 4, -1], [5, 42, 6]]))[0].tolist() == inputs.tolist()
    assert model.encode([3, 4])[1].tolist() == [[3, 4, 10]]

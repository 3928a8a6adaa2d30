"""lr_quant._random: shaped draws, and draws that replay from a recorded generator state."""

import pytest
import torch

from lr_quant._random import randn_as, randn_replayable


@pytest.mark.parametrize("own_generator", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_replay_gives_the_same_draw_and_leaves_generators_alone(own_generator, dtype):
    like = torch.empty(3, 5, 7, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(11) if own_generator else None
    torch.manual_seed(5)
    noise, replay = randn_replayable(like, dtype, gen)
    # the draw is randn_as' draw from the same state
    torch.manual_seed(5)
    reference = randn_as(like, dtype, torch.Generator().manual_seed(11) if own_generator else None)
    assert noise.dtype == dtype and noise.shape == like.shape
    assert torch.equal(noise, reference)
    # the replay is bit for bit the draw, any number of times, and moves no generator
    global_state = torch.get_rng_state()
    own_state = gen.get_state() if gen is not None else None
    assert torch.equal(replay(), noise) and torch.equal(replay(), noise)
    assert torch.equal(torch.get_rng_state(), global_state)
    if gen is not None:
        assert torch.equal(gen.get_state(), own_state)
    # and the next draw continues the stream as if nothing was replayed
    after, _ = randn_replayable(like, dtype, gen)
    assert not torch.equal(after, noise)


def test_no_replay_inside_torch_compile():
    @torch.compile(backend="eager", fullgraph=True)
    def draw(like):
        noise, replay = randn_replayable(like)
        assert replay is None
        return noise

    assert draw(torch.zeros(4, 3)).shape == (4, 3)

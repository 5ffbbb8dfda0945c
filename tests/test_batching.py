"""DynamicBatcher: who waits, who is batched together, and what happens on errors."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from cflowad.engine.inference import InferenceEngine
from cflowad.line.batching import DynamicBatcher


class _Mean(InferenceEngine):
    """Score = mean of the image: a closed form to check every answer against."""

    image_size = (8, 8)

    def __init__(self, fail: bool = False) -> None:
        self.batches: list[int] = []
        self.fail = fail

    def score_batch(self, images: torch.Tensor):
        self.batches.append(len(images))
        if self.fail:
            raise RuntimeError("model exploded")
        scores = images.mean(dim=(1, 2, 3))
        return scores, images.mean(dim=1), scores


def _image(value: float) -> np.ndarray:
    return np.full((8, 8, 3), value, np.float32)


def _run(coroutine):
    return asyncio.run(coroutine)


def test_a_lone_request_does_not_wait_for_companions():
    async def go():
        model = _Mean()
        with ThreadPoolExecutor(1) as pool:
            batcher = DynamicBatcher(model, pool, max_batch=8, max_wait_ms=2000)
            batcher.start()
            start = time.perf_counter()
            result = await batcher.submit(_image(0.25))
            waited = time.perf_counter() - start
            await batcher.close()
        return result, waited, model.batches

    result, waited, batches = _run(go())
    assert result.score == pytest.approx(0.25) and batches == [1]
    assert waited < 1.0  # far below max_wait: nobody else was arriving


def test_requests_still_arriving_join_the_batch_and_answers_are_their_own():
    async def go():
        model = _Mean()
        with ThreadPoolExecutor(1) as pool:
            batcher = DynamicBatcher(model, pool, max_batch=4, max_wait_ms=2000)
            batcher.start()

            async def request(value: float, delay: float) -> float:
                with batcher.arriving():
                    await asyncio.sleep(delay)  # reading and decoding the upload
                    future = batcher.submit(_image(value))
                return (await future).score

            scores = await asyncio.gather(
                *(request(v, 0.05 * i) for i, v in enumerate((0.1, 0.2, 0.3, 0.4, 0.5)))
            )
            await batcher.close()
        return scores, model.batches

    scores, batches = _run(go())
    assert scores == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
    assert batches == [4, 1]  # the fifth waits for the next batch: max_batch is 4


def test_cancelled_requests_are_not_scored():
    async def go():
        model = _Mean()
        with ThreadPoolExecutor(1) as pool:
            batcher = DynamicBatcher(model, pool, max_batch=8, max_wait_ms=0)
            gone = batcher.submit(_image(0.9))
            kept = batcher.submit(_image(0.1))
            gone.cancel()  # the client disconnected before the loop ran
            batcher.start()
            score = (await kept).score
            await batcher.close()
        return score, model.batches

    score, batches = _run(go())
    assert score == pytest.approx(0.1) and batches == [1]


def test_a_failing_batch_answers_its_requests_with_the_error_and_the_loop_goes_on():
    async def go():
        model = _Mean(fail=True)
        with ThreadPoolExecutor(1) as pool:
            batcher = DynamicBatcher(model, pool, max_batch=8, max_wait_ms=0)
            batcher.start()
            with pytest.raises(RuntimeError, match="exploded"):
                await batcher.submit(_image(0.5))
            model.fail = False
            score = (await batcher.submit(_image(0.5))).score
            await batcher.close()
        return score

    assert _run(go()) == pytest.approx(0.5)


def test_close_scores_what_is_queued_then_refuses_more():
    async def go():
        model = _Mean()
        with ThreadPoolExecutor(1) as pool:
            batcher = DynamicBatcher(model, pool, max_batch=2, max_wait_ms=0)
            futures = [batcher.submit(_image(v)) for v in (0.1, 0.2, 0.3)]
            batcher.start()
            await batcher.close()
            with pytest.raises(RuntimeError, match="closed"):
                batcher.submit(_image(0.4))
        return [f.result().score for f in futures], model.batches

    scores, batches = _run(go())
    assert scores == pytest.approx([0.1, 0.2, 0.3]) and batches == [2, 1]


class _Rendezvous(_Mean):
    """Each batch waits for a second batch to run beside it: only parallel scoring ends."""

    def __init__(self) -> None:
        super().__init__()
        self.meet = threading.Barrier(2, timeout=10)

    def score_batch(self, images: torch.Tensor):
        self.meet.wait()
        return super().score_batch(images)


@pytest.mark.slow  # seconds of rendezvous
def test_in_flight_batches_are_scored_at_once_and_answer_their_own_requests():
    async def go(in_flight: int):
        model = _Rendezvous()
        with ThreadPoolExecutor(in_flight) as pool:
            batcher = DynamicBatcher(model, pool, max_batch=1, in_flight=in_flight)
            batcher.start()
            futures = [batcher.submit(_image(v)) for v in (0.25, 0.75)]
            results = await asyncio.gather(*futures, return_exceptions=True)
            await batcher.close()
        return results

    first, second = _run(go(2))
    assert (first.score, second.score) == pytest.approx((0.25, 0.75))
    # one at a time, the first batch waits in vain for a partner: the barrier breaks
    assert all(isinstance(r, threading.BrokenBarrierError) for r in _run(go(1)))

"""The article's environment side as published: its three games and its `InputWrapper`, one copy for the
benchmarks that time the article's loops against ours (`bench_collect.py`, `bench_train.py`)."""

from __future__ import annotations

import ale_py
import cv2
import gymnasium as gym
import numpy as np
from gymnasium import spaces

ARTICLE_GAMES = ("Breakout-v4", "AirRaid-v4", "Pong-v4")


class InputWrapper(gym.ObservationWrapper):
    """The article's wrapper, as published: resize to 64x64, HWC -> CHW, float32."""

    def __init__(self, *args):
        super().__init__(*args)
        old_space = self.observation_space
        assert isinstance(old_space, spaces.Box)
        self.observation_space = spaces.Box(
            self.observation(old_space.low), self.observation(old_space.high), dtype=np.float32
        )

    def observation(self, observation):
        new_obs = cv2.resize(observation, (64, 64))
        new_obs = np.moveaxis(new_obs, 2, 0)
        return new_obs.astype(np.float32)


def article_envs() -> list[InputWrapper]:
    """The article's environments: each game behind its wrapper, unseeded as published."""
    gym.register_envs(ale_py)
    return [InputWrapper(gym.make(name)) for name in ARTICLE_GAMES]

"""The demo task: reach the named block on a table top, seen by a wrist camera (and a second one), drawn with numpy.

    python demo.py --data-dir demo_data      # write it as the RLDS dataset demo_data/nanovla_demo/1.0.0
    python train.py                          # writes it into runs/demo_data (once) and trains on it

It is an RLDS dataset like any other (data.py reads it as `nanovla_demo`) plus a closed-loop simulator, so a model
trained on it can be scored by success rate (demo_success_rate).
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data import ACTION_DIM, tfds, write_rlds

DEMO_COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 225), "yellow": (235, 200, 30)}
DEMO_GRID = 3  # the gripper and the blocks sit on a 3 x 3 grid of cells over the table, which spans [-1, 1]
DEMO_STEP = 2 / (DEMO_GRID - 1)  # table units between neighbouring cells: one move
DEMO_BLOCKS = 2  # the named block and a distractor of another colour
DEMO_CELL_PX = 56  # a cell is 56 px (4 x 4 ViT patches) in the 224 px wrist view
DEMO_MAX_STEPS = 20  # a rollout's budget; the expert needs at most 2 moves, then closes


class DemoEnv:
    """A table with two coloured blocks on a 3 x 3 grid, seen by a wrist camera looking down; "move to the red block".

    The image is centred on the gripper (a dark ring) and pans as it moves; a block fills one cell, 4 x 4 ViT patches.
    Actions are OpenVLA's 7-dim: (dx, dy) move by whole cells, rounded to -1 / 0 / +1 cell per step; the 4 rotation /
    height dims are always 0; the gripper is 1 (open) while moving and 0 when closing. The scripted expert steps one
    cell per axis towards the target, then closes: a model has to read the colour and see on which side of the centre
    that colour is. success = the target block under the gripper.
    mirrored: the image flipped left-right, a world the demo policy never saw (finetune.py's demo teaches it).
    """

    max_steps = DEMO_MAX_STEPS

    def __init__(self, image_size: int = 224, seed: int = 0, mirrored: bool = False):
        self.image_size, self.rng, self.mirrored = image_size, np.random.default_rng(seed), mirrored
        # each pixel's distance from the image centre, in cells
        self.px = (np.arange(image_size) + 0.5 - image_size / 2) / (image_size / 224 * DEMO_CELL_PX)

    def reset(self):
        """A new scene: (image uint8 (S, S, 3), instruction)."""
        self.colors = list(self.rng.choice(list(DEMO_COLORS), size=DEMO_BLOCKS, replace=False))
        cells = self.rng.choice(DEMO_GRID**2, size=DEMO_BLOCKS, replace=False)  # distinct cells of the grid
        self.blocks = np.stack([cells % DEMO_GRID, cells // DEMO_GRID], axis=1) * DEMO_STEP - 1.0
        self.target = int(self.rng.integers(DEMO_BLOCKS))
        while True:  # the gripper starts away from the target
            self.gripper = self.rng.integers(DEMO_GRID, size=2) * DEMO_STEP - 1.0
            if np.abs(self.gripper - self.blocks[self.target]).max() > DEMO_STEP / 2:
                break
        self.instruction = f"move to the {self.colors[self.target]} block"
        return self.render(), self.instruction

    def step(self, action):
        """Apply a 7-dim action (unnormalized); returns (image, success)."""
        move = np.clip(np.round(np.asarray(action, np.float64)[:2] / DEMO_STEP), -1, 1) * DEMO_STEP
        self.gripper = np.clip(self.gripper + move, -1.0, 1.0)
        return self.render(), self.success()

    def success(self) -> bool:
        return bool(np.abs(self.gripper - self.blocks[self.target]).max() < DEMO_STEP / 2)

    def expert_action(self) -> np.ndarray:
        d = self.blocks[self.target] - self.gripper
        move = np.where(np.abs(d) > DEMO_STEP / 2, np.sign(d) * DEMO_STEP, 0.0)
        return np.array([move[0], move[1], 0, 0, 0, 0, float(move.any())], np.float32)

    def render(self) -> np.ndarray:
        S, cell = self.image_size, DEMO_STEP
        x, y = self.gripper[:, None] / cell + self.px  # table position of each pixel column / row, in cells
        image = np.full((S, S, 3), (200, 180, 145), np.uint8)  # wood
        for color, (bx, by) in zip(self.colors, self.blocks):
            image[np.ix_(np.abs(y - by / cell) < 0.5, np.abs(x - bx / cell) < 0.5)] = DEMO_COLORS[color]
        r = np.hypot(*np.meshgrid(self.px, self.px))
        image[(r > 0.3) & (r < 0.4)] = (30, 30, 30)  # the gripper: a dark ring at the centre, the block shows through
        return np.ascontiguousarray(image[:, ::-1]) if self.mirrored else image

    def state(self) -> np.ndarray:  # proprio: the gripper's table position (OFT's proprio token; OpenVLA reads none)
        return self.gripper.astype(np.float32)


def second_view(image: np.ndarray) -> np.ndarray:
    """The second camera (OFT's wrist slot): the same view from a camera turned a quarter, so the table's x axis runs
    down its rows. Without it the tiny OFT demo, trained from scratch, learns dy and never dx: its patches reach the
    LLM row by row, its ViT position embeddings carry little, and RoPE's 1-D positions tell rows apart, not columns."""
    return np.ascontiguousarray(np.rot90(image))


def demo_episode(env: DemoEnv) -> dict:
    """One expert episode as RLDS steps: observation t, action t; the last step is the closing one."""
    (image, instruction), steps = env.reset(), []
    while True:
        action = env.expert_action()
        steps.append({"observation": {"image": image, "wrist_image": second_view(image), "state": env.state()},
                      "action": action, "language_instruction": instruction, "reward": 0.0, "discount": 1.0,
                      "is_first": not steps, "is_last": False, "is_terminal": False})
        if action[-1] == 0.0:  # closed on the target
            break
        image, _ = env.step(action)
    steps[-1].update(reward=1.0, is_last=True, is_terminal=True)
    return {"steps": steps}


# the recipe's 16,000 samples see each of ~4,800 training frames ~3.7 times; fewer, seen more often, generalize worse
DEMO_EPISODES = 2000


def make_demo(data_dir, episodes: int = DEMO_EPISODES, seed: int = 0, image_size: int = 224, mirrored=False) -> Path:
    """Write `episodes` expert episodes (90% train, 10% val) as the RLDS dataset nanovla_demo under data_dir."""
    env = DemoEnv(image_size, seed, mirrored)
    eps = [demo_episode(env) for _ in tqdm(range(episodes), desc="demo episodes", unit="episode", disable=None)]
    n_val = max(1, episodes // 10)
    F = tfds.features
    image = F.Image(shape=(image_size, image_size, 3), dtype=np.uint8, encoding_format="png")  # flat colours: lossless
    features = {"steps": F.Dataset({
        "observation": F.FeaturesDict({"image": image, "wrist_image": image,
                                       "state": F.Tensor(shape=(2,), dtype=np.float32)}),
        "action": F.Tensor(shape=(ACTION_DIM,), dtype=np.float32), "language_instruction": F.Text(),
        "reward": F.Scalar(dtype=np.float32), "discount": F.Scalar(dtype=np.float32),
        **{k: F.Scalar(dtype=np.bool_) for k in ("is_first", "is_last", "is_terminal")}})}
    return write_rlds(data_dir, "nanovla_demo", features, {"train": eps[n_val:], "val": eps[:n_val]})


def demo_success_rate(policy, episodes: int = 50, seed: int = 1234, image_size: int = 224, mirrored=False) -> float:
    """Closed-loop success of policy(image, instruction, state) -> a 7-dim action, or a chunk (K, 7) run in order."""
    env, successes = DemoEnv(image_size, seed, mirrored), 0
    for _ in range(episodes):
        (image, instruction), actions = env.reset(), []
        for _ in range(env.max_steps):
            actions = actions or list(np.atleast_2d(policy(image, instruction, env.state())))
            image, success = env.step(actions.pop(0))
            if success:
                successes += 1
                break
    return successes / episodes


@dataclass
class DemoConfig:
    data_dir: Path = Path("demo_data")
    """write the demo task as an RLDS dataset (nanovla_demo/1.0.0) under this directory"""
    episodes: int = DEMO_EPISODES
    """number of expert episodes (90% train, 10% val)"""
    seed: int = 0
    """seed of the scenes"""


def main(config: DemoConfig) -> Path:
    path = make_demo(config.data_dir, config.episodes, config.seed)
    print(f"wrote {path}; train with python train.py --config.data-root {config.data_dir}")
    return path


if __name__ == "__main__":
    import tyro

    main(tyro.cli(DemoConfig))

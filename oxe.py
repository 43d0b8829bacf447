"""The robot datasets data.py reads, each as data: where its camera, action, gripper, state and instruction live.

This is the original's per-dataset code (prismatic/vla/datasets/rlds/oxe/configs.py and transforms.py) written as one
Layout per dataset; the few datasets that really differ add a short function. Add your own robot with one line:

    data.DATASETS["my_robot"] = oxe.Layout(image="front", gripper=("1-clip", "action[6]"), proprio=("observation/x",))

A feature is a path into an episode's steps ("observation/state"), optionally a slice or one index of its last axis
("action[:6]", "action[6]"); scalar features count as one column; None is a zero column (the original's padding).
"""

import dataclasses
import zlib
from typing import Callable

import numpy as np


def binarize_gripper_actions(g: np.ndarray) -> np.ndarray:
    """> 0.95 -> 1 (open), < 0.05 -> 0 (closed); in-between values take the next decided value (scan from the end,
    which starts from the last raw value, so a trailing in-between run keeps the raw last value), as the original."""
    out, carry = np.empty_like(g), g[-1]
    for t in range(len(g) - 1, -1, -1):
        if g[t] > 0.95 or g[t] < 0.05:
            carry = np.float32(g[t] > 0.95)
        out[t] = carry
    return out


def rel2abs_gripper_actions(g: np.ndarray) -> np.ndarray:
    """Relative gripper commands (< -0.1 open, > 0.1 close, else no change) -> absolute 1 = open / 0 = closed; the
    state before the first command is the opposite of that command (open if there is none), as the original."""
    cmd = np.where(g < -0.1, 1, np.where(g > 0.1, -1, 0))
    nonzero = cmd[cmd != 0]
    state = -nonzero[0] if len(nonzero) else 1
    out = np.empty(len(g), np.float32)
    for t, c in enumerate(cmd):
        state = c if c != 0 else state
        out[t] = state / 2 + 0.5
    return out


# A gripper column (T,) in the dataset's convention -> 1 = open, 0 = closed, in the feature's dtype (transforms.py)
GRIPPER = {
    "rel2abs": rel2abs_gripper_actions,  # relative +1 close / -1 open commands
    "binarize": binarize_gripper_actions,  # noisy absolute, 1 = open
    "1-clip": lambda g: 1 - np.clip(g, 0, 1),  # absolute, +1 = closed, -1 (or 0) = open
    "1-x": lambda g: 1 - g,  # absolute 0..1, 1 = closed (not clipped)
    "clip": lambda g: np.clip(g, 0, 1),  # absolute, +1 = open, -1 = closed
    "x": lambda g: g,  # already 1 = open (bools become 0/1)
    "closed": lambda g: np.zeros(len(g), np.float32),  # no gripper action stored: always 0
    "open": lambda g: np.ones(len(g), np.float32),  # always 1
}


def euler_from_quaternion(q: np.ndarray) -> np.ndarray:
    """(T, 4) quaternions (x, y, z, w) -> (T, 3) roll, pitch, yaw as tensorflow_graphics' euler.from_quaternion (the
    original's): terms shrunk by (1 - 2 eps), signed 2 eps added before atan2, |r20| within 1e-6 of 1 is a gimbal lock
    (third angle 0). float32, with TF's asin/atan2 for the same bits."""
    import tensorflow as tf  # loaded by data.py already

    eps, shrink = np.float32(2 * np.finfo(np.float32).eps), np.float32(1 - 2 * np.finfo(np.float32).eps)
    sign = lambda v: tf.where(v < 0, np.float32(-1), np.float32(1))  # noqa: E731 (tfg's nonzero_sign)
    x, y, z, w = tf.unstack(tf.constant(q, tf.float32), axis=-1)
    tx, ty, tz = (2 * v * shrink for v in (x, y, z))
    r00, r10, r21 = (1 - (ty * y + tz * z)) * shrink, (ty * x + tz * w) * shrink, (tz * y + tx * w) * shrink
    r22, r20 = (1 - (tx * x + ty * y)) * shrink, (tz * x - ty * w) * shrink
    r01, r02 = (ty * x - tz * w) * shrink, (tz * x + ty * w) * shrink
    pitch = -tf.asin(r20)
    c = sign(tf.cos(pitch))
    general = tf.stack([tf.atan2(r21 * c, (sign(r22) * eps + r22) * c), pitch,
                        tf.atan2(r10 * c, (sign(r00) * eps + r00) * c)], axis=1)
    s = sign(r20)
    gimbal = tf.stack([tf.atan2(-s * r01, -s * (sign(r02) * eps + r02)), -s * np.float32(np.pi / 2),
                       tf.zeros_like(r20)], axis=1)
    return tf.where((tf.abs(tf.abs(r20) - 1) < 1e-6)[:, None], gimbal, general).numpy()


# Per-dataset functions, (steps, standardized) -> standardized, only where a dataset is not just data

def bridge_relabel(steps, out):
    """BridgeData V2 (bridge_orig_dataset_transform + relabel_bridge_actions): step 0's all-zero action is dropped,
    movement = next state - this state (Euler angles subtracted without wrapping), the last step is dropped: T - 2
    frames; frame t has image, instruction and binarized gripper of raw step t+1."""
    state = steps["observation"]["state"][1:, :6]
    out = {k: v[1:-1] for k, v in out.items()}
    out["action"][:, :6] = state[1:] - state[:-1]
    return out


def euler_rotation(steps, out):
    """action[3:7] is an orientation quaternion: roll/pitch/yaw from it (furniture_bench, iamlab_cmu_pickup_insert)."""
    out["action"][:, 3:6] = euler_from_quaternion(steps["action"][:, 3:7])
    return out


def kuka_state(steps, out):
    """kuka stores its state zlib-compressed (float32 bytes per step), which the original's transform decodes."""
    obs = steps["observation"]
    parts = [np.frombuffer(zlib.decompress(b), np.float32) for b in obs["clip_function_input/base_pose_tool_reached"]]
    gripper = [np.frombuffer(zlib.decompress(b), np.float32) for b in obs["gripper_closed"]]
    return {**out, "proprio": np.concatenate([np.stack(parts).reshape(-1, 7), np.stack(gripper).reshape(-1, 1)], 1)}


def language_table_instruction(steps, out):
    """language_table's instruction is (T, 512) unicode code points, zero-padded."""
    text = ["".join(map(chr, row)).split("\x00")[0].encode() for row in steps["observation"]["instruction"]]
    return {**out, "instruction": np.array(text, dtype=object)}


# DROID keeps frames that move (> 1e-5 from zero, normalized by real DROID's q01/q99: droid_utils.py zero_action_filter)
DROID_Q01 = np.float32([-0.7776297926902771, -0.5803514122962952, -0.5795090794563293, -0.6464047729969025,
                        -0.7041108310222626, -0.8895104378461838])
DROID_Q99 = np.float32([0.7597932070493698, 0.5726242214441299, 0.7351000607013702, 0.6705610305070877,
                        0.6464948207139969, 0.8897542208433151])


def droid_moves(normalized: np.ndarray) -> np.ndarray:
    zero = 2 * (0 - DROID_Q01) / (DROID_Q99 - DROID_Q01 + np.float32(1e-8)) - 1
    return np.any(np.abs(normalized[:, :6] - zero) > 1e-5, axis=1)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where one dataset keeps what OpenVLA trains on (see the module docstring for the feature paths)."""

    image: str | tuple = "image"  # observation/<key> of the primary camera; a pair: one of the two per episode
    movement: tuple = ("action[:6]",)  # concatenated to 6 dims: xyz, roll/pitch/yaw
    gripper: tuple = ("1-clip", "action[6]")  # (GRIPPER rule, its raw column)
    proprio: tuple = ()  # the config's state_obs_keys, concatenated (OpenVLA trains without them; OFT reads them)
    instruction: str | None = "language_instruction"
    fn: Callable | None = None  # (steps, standardized) -> standardized, where a dataset really differs
    keep: Callable | None = None  # normalized actions (T, 7) -> frames to train on (DROID)
    wrist: str | None = None  # observation/<key> of the wrist camera, when it is read


RTX, S = "observation/natural_language_instruction", "observation/state"  # the RT-X datasets' instruction
WV_RD = ("action/world_vector", "action/rotation_delta")  # their movement
LIBERO = Layout(proprio=(f"{S}[:6]", f"{S}[-2:]"), wrist="wrist_image")

# Dataset name (the directory under data_root) -> its Layout; the OXE ones as OpenVLA's oxe/configs.py
DATASETS = {
    "fractal20220817_data": Layout(movement=WV_RD, gripper=("rel2abs", "action/gripper_closedness_action"),
                                   proprio=("observation/base_pose_tool_reached", "observation/gripper_closed"),
                                   instruction=RTX),
    "kuka": Layout(movement=WV_RD, gripper=("rel2abs", "action/gripper_closedness_action"), instruction=RTX,
                   fn=kuka_state),
    "bridge_orig": Layout(image="image_0", gripper=("binarize", "action[6]"), proprio=(f"{S}[:6]", None, f"{S}[-1]"),
                          fn=bridge_relabel),
    "taco_play": Layout(image="rgb_static", movement=("action/rel_actions_world[:6]",), instruction=RTX,
                        gripper=("clip", "action/rel_actions_world[6]"),
                        proprio=("observation/robot_obs[:6]", None, "observation/robot_obs[7]")),
    "jaco_play": Layout(movement=("action/world_vector", None, None, None), instruction=RTX,
                        gripper=("rel2abs", "action/gripper_closedness_action"),
                        proprio=("observation/end_effector_cartesian_pos[:6]", None,
                                 "observation/end_effector_cartesian_pos[-1]")),
    "berkeley_cable_routing": Layout(movement=WV_RD, gripper=("closed", None), instruction=RTX,
                                     proprio=("observation/robot_state", None)),
    "roboturk": Layout(image="front_rgb", movement=WV_RD, gripper=("1-clip", "action/gripper_closedness_action"),
                       proprio=(None,) * 8, instruction=RTX),
    "viola": Layout(image="agentview_rgb", movement=WV_RD, gripper=("1-clip", "action/gripper_closedness_action"),
                    proprio=("observation/joint_states", "observation/gripper_states"), instruction=RTX),
    "berkeley_autolab_ur5": Layout(movement=WV_RD, gripper=("rel2abs", "action/gripper_closedness_action"),
                                   proprio=("observation/robot_state[6:14]",), instruction=RTX),
    "toto": Layout(movement=WV_RD, gripper=("x", "action/open_gripper"), proprio=(S, None), instruction=RTX),
    "language_table": Layout(image="rgb", movement=("action", None, None, None, None), gripper=("open", None),
                             proprio=("observation/effector_translation",) + (None,) * 6,
                             instruction=None, fn=language_table_instruction),
    "stanford_hydra_dataset_converted_externally_to_rlds": Layout(
        gripper=("1-x", "action[6]"), proprio=(f"{S}[:3]", f"{S}[7:10]", None, f"{S}[-3]")),
    "austin_buds_dataset_converted_externally_to_rlds": Layout(proprio=(f"{S}[:8]",)),
    "nyu_franka_play_dataset_converted_externally_to_rlds": Layout(
        movement=("action[-8:-2]",), gripper=("clip", "action[-2]"), proprio=(f"{S}[-6:]", None, None)),
    "furniture_bench_dataset_converted_externally_to_rlds": Layout(
        movement=("action[:3]", None, None, None), gripper=("1-clip", "action[7]"),
        proprio=(f"{S}[:7]", f"{S}[-1]"), fn=euler_rotation),
    "ucsd_kitchen_dataset_converted_externally_to_rlds": Layout(gripper=("x", "action[6]"), proprio=(f"{S}[:7]", None)),
    "austin_sailor_dataset_converted_externally_to_rlds": Layout(proprio=(S,)),
    "austin_sirius_dataset_converted_externally_to_rlds": Layout(proprio=(S,)),
    "dlr_edan_shared_control_converted_externally_to_rlds": Layout(gripper=("1-x", "action[6]"), proprio=(S, None)),
    "iamlab_cmu_pickup_insert_converted_externally_to_rlds": Layout(
        movement=("action[:3]", None, None, None), gripper=("x", "action[7]"), proprio=(f"{S}[:7]", f"{S}[7]"),
        fn=euler_rotation),
    "utaustin_mutex": Layout(proprio=(f"{S}[:8]",)),
    # no gripper action stored: the original inverts the *observed* gripper state
    "berkeley_fanuc_manipulation": Layout(gripper=("1-x", f"{S}[6]"), proprio=(f"{S}[:6]", None, f"{S}[6]")),
    "cmu_stretch": Layout(gripper=("x", "action[6]"), proprio=(f"{S}[:3]", None, None, None, None, f"{S}[-1]")),
    "bc_z": Layout(movement=("action/future/xyz_residual[:3]", "action/future/axis_angle_residual[:3]"),
                   gripper=("1-x", "action/future/target_close[0]"), instruction=RTX,
                   proprio=("observation/present/xyz", "observation/present/axis_angle", None,
                            "observation/present/sensed_close")),
    "fmb_dataset": Layout(image="image_side_1", gripper=("x", "action[6]"),
                          proprio=("observation/eef_pose", "observation/state_gripper_pose")),
    "dobbe": Layout(image="wrist_image", gripper=("x", "action[6]"), proprio=(S,)),
    # the original swaps the two exterior cameras at random per trajectory (droid_utils.py rand_swap_exterior_images)
    "droid": Layout(image=("exterior_image_1_left", "exterior_image_2_left"), keep=droid_moves,
                    movement=("action_dict/cartesian_velocity",), gripper=("1-x", "action_dict/gripper_position"),
                    proprio=("observation/cartesian_position", "observation/gripper_position")),
    **{f"libero_{s}_no_noops": LIBERO for s in ("spatial", "object", "goal", "10")},
    "nanovla_demo": Layout(gripper=("x", "action[6]"), proprio=(S,), wrist="wrist_image"),  # demo.py: already standard
}

# The original's OXE_NAMED_MIXTURES (oxe/mixtures.py) as "name:weight, ..." (what --data-mix also takes), weights
# before balancing by size; a repeated name keeps its first weight, as the original. A dataset name alone is a mixture
# of itself with weight 1.0. Names not in DATASETS fail with "not supported yet" before any data is read.
_X = "_converted_externally_to_rlds"
_RTX = ("fractal20220817_data:0.54087122203, kuka:0.8341046294, bridge_orig:1.0, taco_play:2.0, jaco_play:2.0, "
        "berkeley_cable_routing:3.0, roboturk:1.0, viola:2.0, berkeley_autolab_ur5:1.0, toto:1.0")
_SOUP_A = ("kuka:0.8341046294, bridge_orig:1.0, taco_play:2.0, jaco_play:1.0, berkeley_cable_routing:1.0, "
           "roboturk:2.0, viola:2.0, berkeley_autolab_ur5:2.0, toto:1.0")
_SOUP_B = (f"stanford_hydra_dataset{_X}:2.0, austin_buds_dataset{_X}:1.0, nyu_franka_play_dataset{_X}:3.0, "
           f"furniture_bench_dataset{_X}:0.1, ucsd_kitchen_dataset{_X}:2.0, austin_sailor_dataset{_X}:1.0, "
           f"austin_sirius_dataset{_X}:1.0, dlr_edan_shared_control{_X}:1.0, iamlab_cmu_pickup_insert{_X}:1.0, "
           "utaustin_mutex:1.0, berkeley_fanuc_manipulation:2.0, cmu_stretch:1.0")
MIXTURES = {
    "bridge": "bridge_orig:1.0",
    "bridge_rt_1": "bridge_orig:1.0, fractal20220817_data:1.0",
    "rtx": _RTX,
    "rtx_franka": _RTX + ", taco_play:1.0, berkeley_cable_routing:1.0, viola:1.0, toto:1.0, "
    f"stanford_hydra_dataset{_X}:1.0, austin_buds_dataset{_X}:3.0, nyu_franka_play_dataset{_X}:3.0, "
    f"maniskill_dataset{_X}:0.1, furniture_bench_dataset{_X}:0.1, cmu_franka_exploration_dataset{_X}:5.0, "
    f"austin_sailor_dataset{_X}:1.0, austin_sirius_dataset{_X}:1.0, berkeley_rpt{_X}:1.0, kaist_nonprehensile{_X}:3.0, "
    f"stanford_robocook{_X}:1.0, iamlab_cmu_pickup_insert{_X}:1.0, utaustin_mutex:1.0, cmu_play_fusion:1.0",
    "oxe_magic_soup": f"fractal20220817_data:0.54087122203, {_SOUP_A}, language_table:0.1, {_SOUP_B}",
    # the first ~70% of OpenVLA-7B's training
    "oxe_magic_soup_plus": f"fractal20220817_data:0.54087122203, {_SOUP_A}, language_table:0.1, {_SOUP_B}, bc_z:0.2, "
    "fmb_dataset:1.0, dobbe:0.2, droid:0.06",
    # OpenVLA-7B's final mixture (its 25 norm_stats keys): RT-1 at full weight, no language_table, no DROID
    "oxe_magic_soup_plus_minus": f"fractal20220817_data:1.0, {_SOUP_A}, {_SOUP_B}, bc_z:0.2, fmb_dataset:1.0, "
    "dobbe:0.2",
    "libero_mix": ", ".join(f"libero_{s}_no_noops:1.0" for s in ("spatial", "object", "goal", "10")),
    # named in the original's mixtures.py; their datasets are not supported here
    **{n: n for n in ("droid_wipe tdroid_carrot_in_bowl tdroid_pour_corn_in_pot tdroid_flip_pot_upright "
                      "tdroid_move_object_onto_plate tdroid_knock_object_over tdroid_cover_object_with_towel").split()},
}

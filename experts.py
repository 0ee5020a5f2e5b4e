"""Scripted experts: the hand-written controllers behind the offline demonstrations (collect_demos.py runs them).

robosuite (OSC_POSE, 7-D delta action per arm): small phase machines that read object and gripper poses from the
simulator. Lift, Can and Square use one Panda; TwoArmTransport two (robot0 unpacks the hammer and hands it over,
robot1 clears the trash and places the hammer). The Square, Transport and Kitchen experts are stateless -- each
action is a function of the current simulator state and the episode's sampled parameters, with no phase memory or
timers -- so they can label any state a learner reaches (DAgger, collect_demos.dagger). Per-episode randomness
(gains, speed caps, hover heights, waypoint offsets, grasp durations, Gaussian action noise) makes the
demonstrations vary like robomimic's multi-human ("MH") data (Mandlekar et al. 2021, robomimic, arXiv 2108.03298).

FrankaKitchen-v1 (9-D joint-velocity-like action): damped-least-squares IK on the MuJoCo model with a gravity
feed-forward and joint-limit handling; the subtask in hand is the first of the episode's order that the state shows
unfinished, its branch is read from the hand, the fingers and the object's joint (kitchen tasks as in D4RL, Fu et al.
2020, arXiv 2004.07219):
  * the action a in [-1, 1]^9 sets a position-servo target q_obs + 2*a*dt (q_obs = the noisy observed joint
    positions, dt = 0.08 s); the servos have no gravity compensation and heavy joint damping, so the action is a
    joint velocity scaled by damping/kp plus a gravity feed-forward term;
  * joint 2 starts past its limit, so joints near a limit are dropped from the IK and it is solved again;
  * per-episode variation: subtask order (where the geometry allows), waypoint offsets, speed caps, noise.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial.transform import Rotation

import tasks

# ----------------------------------------------------------------------------- geometry
POS_SCALE = 0.05  # metres per unit of position action (OSC_POSE output_max)
ROT_SCALE = 0.5  # radians per unit of rotation action
GRIP_OPEN, GRIP_CLOSE = -1.0, 1.0
# Gripper pointing down at yaw 0: site x (finger-closing axis) = world +y, site z = world -z.
R_DOWN = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]])


def rot_z(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def down_at_yaw(yaw: float) -> np.ndarray:
    """Top-down gripper orientation whose fingers close along rot_z(yaw) @ (0, 1, 0)."""
    return rot_z(yaw) @ R_DOWN


def body_yaw(R: np.ndarray) -> float:
    """Yaw of a body's x axis in the world xy plane."""
    return float(np.arctan2(R[1, 0], R[0, 0]))


def gripper_yaw(R: np.ndarray) -> float:
    """Inverse of down_at_yaw for the yaw part (column 0 = (-sin, cos, 0))."""
    return float(np.arctan2(-R[0, 0], R[1, 0]))


def wrap(a: float, period: float = 2 * np.pi) -> float:
    """Wrap an angle to [-period/2, period/2)."""
    return float((a + period / 2) % period - period / 2)


def rot_err(R_tgt: np.ndarray, R: np.ndarray) -> np.ndarray:
    """World-frame rotation vector taking R to R_tgt (the controller applies R(delta) @ R)."""
    return Rotation.from_matrix(R_tgt @ R.T).as_rotvec()


# ----------------------------------------------------------------------------- experts
class ArmExpert:
    """Phase-machine expert for one Panda (robot `robot` of the env) with the OSC_POSE + gripper action.

    Subclasses implement `sample()` (per-episode parameters) and `policy()` (returns the
    clean action and may call `goto`). `__call__` adds Gaussian noise and clips. Targets are
    world-frame poses; tasks.robosuite_kwargs sets the OSC's input frame to world for every arm,
    so the same servo drives both (opposed) arms of TwoArmTransport.
    """

    first_phase = "hover"
    max_retries = 3
    stateless = False  # True: policy() depends on the sim state and sample()'s parameters only (can label any state)

    def __init__(self, sim_env, rng: np.random.Generator, noise: float, robot: int = 0):
        self.env = sim_env
        self.sim = sim_env.sim
        self.rng = rng
        self.noise = noise
        self.robot = sim_env.robots[robot]
        self.site = self.robot.eef_site_id["right"]
        self.kp = rng.uniform(0.8, 1.2)
        self.vmax = rng.uniform(0.6, 1.0)
        self.phase, self.t = self.first_phase, 0
        self.retries = 0
        self.R_grasp = None  # wrist orientation while an object is held (set by grasp_phases when it closes)
        self.sample()

    # -- helpers
    def eef(self):
        d = self.sim.data
        return d.site_xpos[self.site].copy(), d.site_xmat[self.site].reshape(3, 3).copy()

    def body(self, body_id: int):
        d = self.sim.data
        return d.body_xpos[body_id].copy(), d.body_xmat[body_id].reshape(3, 3).copy()

    def finger_gap(self) -> float:
        q = self.sim.data.qpos[self.robot._ref_gripper_joint_pos_indexes["right"]]
        return float(q[0] - q[1])

    def goto(self, phase: str):
        self.phase, self.t = phase, -1  # t is incremented after policy()

    def servo(self, tgt_pos, tgt_R, grip, vmax=None, vmax_z=None, kp_xy=1.0, rot_gain=1.5) -> np.ndarray:
        """P-control towards an absolute pose. With vmax_z, xy and z speeds are capped separately;
        kp_xy scales the xy gain (fine alignment), rot_gain the orientation gain."""
        pos, R = self.eef()
        vmax = self.vmax if vmax is None else vmax
        v = self.kp * (np.asarray(tgt_pos) - pos) / POS_SCALE
        v[:2] *= kp_xy
        if vmax_z is None:
            n = np.linalg.norm(v)
            if n > vmax:
                v *= vmax / n
        else:
            n = np.linalg.norm(v[:2])
            if n > vmax:
                v[:2] *= vmax / n
            v[2] = np.clip(v[2], -vmax_z, vmax_z)
        w = np.clip(rot_gain * rot_err(tgt_R, R) / ROT_SCALE, -1.0, 1.0)
        return np.concatenate([v, w, [grip]])

    def pos_err(self, tgt_pos) -> float:
        return float(np.linalg.norm(np.asarray(tgt_pos) - self.eef()[0]))

    def ang_err(self, tgt_R) -> float:
        return float(np.linalg.norm(rot_err(tgt_R, self.eef()[1])))

    def retry(self):
        """Grasp lost or phase timed out: open and start over (bounded)."""
        self.retries += 1
        self.goto("reopen" if self.retries <= self.max_retries else "give_up")

    # -- interface
    def sample(self):
        raise NotImplementedError

    def policy(self) -> np.ndarray:
        raise NotImplementedError

    def __call__(self) -> np.ndarray:
        a = self.policy()
        self.t += 1
        self.clean = np.clip(a, -1.0, 1.0)  # the noiseless action: DAgger's label (collect_demos.run_dagger_episode)
        if self.noise > 0:
            a = a + self.rng.normal(0.0, self.noise, 7) * np.array([1, 1, 1, 0.3, 0.3, 0.3, 0])
        return np.clip(a, -1.0, 1.0)

    def grasp_phases(self, hover_tgt, grasp_tgt, R_t, descend_timeout, grasp_tol=0.008, hover_xy_tol=None):
        """hover above the grasp point -> descend onto it -> close the gripper; shared by every expert.
        Returns an action, or None when the phase is not one of these three."""
        if self.phase == "hover":
            xy_ok = hover_xy_tol is None or np.linalg.norm(hover_tgt[:2] - self.eef()[0][:2]) < hover_xy_tol
            if xy_ok and self.pos_err(hover_tgt) < 0.012 and self.ang_err(R_t) < 0.08:
                self.goto("descend")
            return self.servo(hover_tgt, R_t, GRIP_OPEN)
        if self.phase == "descend":
            if self.pos_err(grasp_tgt) < grasp_tol or self.t > descend_timeout:
                self.goto("close")
                self.hold = grasp_tgt
            return self.servo(grasp_tgt, R_t, GRIP_OPEN, vmax_z=self.descend_vmax)
        if self.phase == "close":
            if self.t >= self.close_steps:
                self.goto("lift")
                # carried objects keep the grasp orientation: re-aiming at a grasp point that moves with the
                # object would chase it
                self.R_grasp = R_t
            return self.servo(self.hold, R_t, GRIP_CLOSE)
        return None

    def carry_phases(self, d, carry_z: float, R_t, lift_tol: float = 0.03) -> np.ndarray | None:
        """After a grasp: "lift" straight up to carry_z, then "carry" until the *object's* xy offset to its drop
        point, d, is under 2 cm, then hand over to "lower". Returns an action, or None in other phases."""
        pos = self.eef()[0]
        if self.phase == "lift":
            if pos[2] > carry_z - lift_tol:
                self.goto("carry")
            return self.servo([self.hold[0], self.hold[1], carry_z], R_t, GRIP_CLOSE)
        if self.phase == "carry":
            if np.linalg.norm(d) < 0.02:
                self.goto("lower")
            return self.servo(np.append(pos[:2] + d, carry_z), R_t, GRIP_CLOSE)
        return None

    def release_phases(self, d, lower_z: float, lowered: bool, R_t, then: str) -> np.ndarray | None:
        """"lower": hand down to lower_z while the object's xy offset d is servoed out, until `lowered`; then
        "release": open in place for open_steps, then `then`. Returns an action, or None in other phases."""
        pos = self.eef()[0]
        if self.phase == "lower":
            if lowered:
                self.goto("release")
                self.hold = pos
            return self.servo(np.append(pos[:2] + d, lower_z), R_t, GRIP_CLOSE, vmax=0.6)
        if self.phase == "release":
            if self.t >= self.open_steps:
                self.goto(then)
            return self.servo(self.hold, R_t, GRIP_OPEN)
        return None

    def common_phases(self, hold_R) -> np.ndarray | None:
        """Phases shared by all experts (recovery). Returns an action or None."""
        pos, _ = self.eef()
        if self.phase == "reopen":  # open and rise, then start again
            if self.t >= 8:
                self.goto(self.first_phase)
            return self.servo(pos + [0, 0, 0.03], hold_R, GRIP_OPEN)
        if self.phase == "give_up":
            return self.servo(pos, hold_R, GRIP_OPEN)
        return None


class LiftExpert(ArmExpert):
    """Hover over the cube, descend, close, lift to ~1.05 m."""

    def sample(self):
        r = self.rng
        self.hover_h = r.uniform(0.06, 0.12)
        self.hover_off = r.uniform(-0.01, 0.01, 2)
        self.grasp_off = np.append(r.uniform(-0.004, 0.004, 2), -0.005 + r.uniform(-0.003, 0.003))
        self.close_steps = int(r.integers(6, 12))
        self.lift_z = r.uniform(1.0, 1.08)
        self.descend_vmax = r.uniform(0.4, 0.6)
        self.cube_id = self.env.cube_body_id

    def policy(self):
        cube, Rc = self.body(self.cube_id)
        R_t = down_at_yaw(wrap(body_yaw(Rc), np.pi / 2))  # cube is 4-fold symmetric
        pos, _ = self.eef()
        a = self.common_phases(R_t)
        if a is not None:
            return a
        a = self.grasp_phases(cube + np.append(self.hover_off, self.hover_h), cube + self.grasp_off, R_t, 40)
        if a is not None:
            return a
        if self.phase == "lift":
            if self.t > 5 and (pos[2] - cube[2] > 0.03 or self.finger_gap() < 0.01):
                self.retry()
            return self.servo([self.hold[0], self.hold[1], self.lift_z], R_t, GRIP_CLOSE)
        raise ValueError(self.phase)


class CanExpert(ArmExpert):
    """Grasp the can from above, carry it over the bin quadrant, release ~5 cm above the floor."""

    # Aim well inside the target quadrant: its centre (0.1975, 0.4025) is at the Panda's reach edge.
    DROP_XY = np.array([0.15, 0.34])

    def sample(self):
        r = self.rng
        self.hover_h = r.uniform(0.08, 0.14)
        self.yaw = r.uniform(-0.3, 0.3)
        self.grasp_off = np.append(r.uniform(-0.004, 0.004, 2), 0.01 + r.uniform(-0.005, 0.005))
        self.close_steps = int(r.integers(8, 12))
        self.carry_z = r.uniform(1.02, 1.08)
        self.drop_xy = self.DROP_XY + r.uniform(-0.015, 0.015, 2)
        self.release_z = r.uniform(0.93, 0.97)
        self.open_steps = 6
        self.descend_vmax = r.uniform(0.4, 0.6)
        self.can_id = self.env.obj_body_id["Can"]

    def policy(self):
        can, _ = self.body(self.can_id)
        R_t = down_at_yaw(self.yaw)
        pos, _ = self.eef()
        a = self.common_phases(R_t)
        if a is not None:
            return a
        held = self.phase in ("lift", "carry", "lower")
        if held and self.t > 5 and (pos[2] - can[2] > 0.04 or self.finger_gap() < 0.01):
            self.retry()
            return self.servo(pos, R_t, GRIP_OPEN)
        a = self.grasp_phases(can + [0.0, 0.0, self.hover_h], can + self.grasp_off, R_t, 50)
        if a is not None:
            return a
        a = self.carry_phases(self.drop_xy - can[:2], self.carry_z, R_t)  # servo the *can's* xy onto the drop point
        if a is not None:
            return a
        a = self.release_phases(self.drop_xy - can[:2], self.release_z,
                                pos[2] < self.release_z + 0.01 or self.t > 60, R_t, "retreat")
        if a is not None:
            return a
        if self.phase == "retreat":
            return self.servo(np.append(self.hold[:2], 1.1), R_t, GRIP_OPEN)
        raise ValueError(self.phase)


class SquareExpert(ArmExpert):
    """Grasp the nut's handle, yaw it to 180/270 deg over peg 1, lower it onto the peg.

    Stateless: the clean action is a function of the current simulator state and the episode's parameters
    (`sample`) only -- no phase memory, timers or counters -- so the expert can label any state a learner reaches
    (DAgger, Ross et al. 2011, arXiv 1011.0686). The phase is read from the state each step:
      placed   nut low and centred on the peg          -> open in place, then rise
      held     handle between fingers closed on it     -> lift clear / align over the peg / lower
      closing  at the grasp point, fingers not closed  -> close
      missed   fingers closed (partly) on nothing      -> open while rising
      free     otherwise                               -> hover over the handle, descend once aligned
    `self.phase` holds the name of the branch taken (diagnostics only; the next call recomputes it).
    """

    stateless = True
    PLACED_Z = 0.835  # nut body z once it sits around the peg (table top 0.82; the peg's top is ~0.9)
    HELD_GAP = (0.015, 0.034)  # finger gap closed on the 2 cm handle (0.030); open is 0.079, on nothing < 0.01

    def sample(self):
        r = self.rng
        self.hover_h = r.uniform(0.06, 0.10)
        self.grasp_off = np.array([0.0, 0.0, -0.003 + r.uniform(-0.002, 0.002)])
        self.handle_shift = r.uniform(0.0, 0.008)  # along the handle, away from the ring
        self.carry_z = r.uniform(1.00, 1.04)
        self.lower_vz = r.uniform(0.3, 0.5)
        self.kp_xy = r.uniform(1.5, 2.0)  # stiffer xy servo of the nut centre over the peg
        self.rot_gain = r.uniform(2.5, 3.5)  # and of the wrist: ~1 deg of tilt already jams the nut
        self.descend_vmax = r.uniform(0.4, 0.6)
        m = self.sim.model
        self.nut_id = self.env.obj_body_id["SquareNut"]
        self.handle_site = m.site_name2id("SquareNut_handle_site")
        self.peg_id = self.env.peg1_body_id

    def policy(self):
        # positions/orientations of the current qpos: after env.step they are one physics substep old (mj_step
        # integrates after computing them), after a restored state they are current; forward() makes both agree
        self.sim.forward()
        d = self.sim.data
        nut, Rn = self.body(self.nut_id)
        nut_yaw = body_yaw(Rn)
        grip_pt = d.site_xpos[self.handle_site] + self.handle_shift * Rn[:, 0] + self.grasp_off
        peg = d.body_xpos[self.peg_id]
        pos, R = self.eef()
        gap = self.finger_gap()
        dxy = peg[:2] - nut[:2]
        rel = grip_pt - pos
        in_hand = np.linalg.norm(rel) < 0.02
        if nut[2] < self.PLACED_Z and np.linalg.norm(dxy) < 0.02:
            self.phase = "release" if gap < 0.075 else "retreat"
            tgt = pos if gap < 0.075 else np.append(pos[:2], 1.05)
            return self.servo(tgt, down_at_yaw(gripper_yaw(R)), GRIP_OPEN)
        if in_hand and self.HELD_GAP[0] < gap < self.HELD_GAP[1]:
            return self.held(nut, nut_yaw, dxy, pos, R)
        grasp_R = down_at_yaw(wrap(nut_yaw, np.pi))
        xy_err = np.linalg.norm(rel[:2])
        if in_hand and gap > self.HELD_GAP[0] and (gap < 0.075 or (xy_err < 0.006 and abs(rel[2]) < 0.008)):
            self.phase = "close"  # at the grasp point (or already closing on the handle): close in place
            return self.servo(grip_pt, grasp_R, GRIP_CLOSE)
        if gap < 0.07:
            self.phase = "reopen"  # closed on nothing or lost the handle: open while rising
            return self.servo(pos + [0, 0, 0.03], down_at_yaw(gripper_yaw(R)), GRIP_OPEN)
        if xy_err < 0.008 and self.ang_err(grasp_R) < 0.1:
            self.phase = "descend"
            return self.servo(grip_pt, grasp_R, GRIP_OPEN, vmax_z=self.descend_vmax)
        self.phase = "hover"
        return self.servo(grip_pt + [0.0, 0.0, self.hover_h], grasp_R, GRIP_OPEN)

    def held(self, nut, nut_yaw, dxy, pos, R):
        """The nut is in the hand: lift it clear, yaw it to the goal over the peg, lower it while centred."""
        yaw_e = wrap(self.goal_yaw(nut_yaw, gripper_yaw(R)) - nut_yaw)
        R_t = down_at_yaw(gripper_yaw(R) + yaw_e)  # absolute pitch/roll (down), only yaw relative
        gains = dict(kp_xy=self.kp_xy, rot_gain=self.rot_gain)
        e = np.linalg.norm(dxy)
        if e < 0.01 and abs(yaw_e) < 0.08:  # over the peg: step down only while centred, else hold the height
            self.phase = "lower"
            z = pos[2] - 0.03 if e < 0.003 and abs(yaw_e) < 0.05 else pos[2]
            return self.servo(np.append(pos[:2] + dxy, z), R_t, GRIP_CLOSE, vmax_z=self.lower_vz, **gains)
        if pos[2] < self.carry_z - 0.015:  # lift clear (off the table, or off a jammed peg top) before moving
            self.phase = "lift"
            # the wrist keeps its yaw on the way up: turning it while lifting stalls the arm
            return self.servo(np.append(pos[:2], self.carry_z), down_at_yaw(gripper_yaw(R)), GRIP_CLOSE, vmax_z=0.5)
        self.phase = "align"
        return self.servo(np.append(pos[:2] + dxy, self.carry_z), R_t, GRIP_CLOSE, vmax_z=0.5, **gains)

    @staticmethod
    def goal_yaw(nut_yaw: float, grip_yaw: float) -> float:
        """Nut yaw 180 or 270 deg: the handle then sits on the robot side of the peg. (0 deg puts the
        gripper at the reach edge, 90 deg near it: the arm stalls and tilts, the nut jams.)
        The one needing the least wrist rotation that keeps |gripper yaw| < 150 deg (joint 7); a deterministic
        rule of the current state (the hand-to-nut yaw offset is fixed while the nut is held), ties to 180."""
        offset = wrap(nut_yaw - grip_yaw)
        best = None
        for goal in (np.pi, 1.5 * np.pi):
            g_yaw = wrap(goal - offset)
            if abs(g_yaw) > np.deg2rad(150):
                continue
            cost = abs(wrap(g_yaw - grip_yaw))
            if best is None or cost < best[0] - 1e-9:
                best = (cost, goal)
        return best[1] if best else 1.5 * np.pi


# TwoArmTransport: robot0 (base at y=-0.81, facing +y) works on table 0 (start bin at y~-0.45), robot1
# (y=+0.81, facing -y) on table 1 (target bin x~-0.2, trash bin x~+0.2). Neither reaches the other table,
# so the hammer is handed over in the air between the tables: robot0 presents it with the handle along y,
# robot1 grasps the handle on its side of robot0's fingers, then robot0 lets go.
NEUTRAL_YAW = (np.pi / 2, -np.pi / 2)  # down_at_yaw of each robot's wrist at its home pose (fingers along x)
SIDE = (-1.0, 1.0)  # each robot's side of the gap between the tables (world y sign)


# The transport and kitchen experts' per-episode parameters (transport: hand-over point, waiting point, hover, carry
# and drop heights, speeds, gains; kitchen: pre-grasp offsets, grasp heights, speed caps, lift heights) are drawn from
# the middle quarter of each range written below. The policy cannot see them, and drawn from the whole ranges they
# made the clean action at one state differ by 0.19 on average between draws for transport (0.07 for the square
# expert's) and by 0.14 at a kitchen learner's states, a spread the policy can only average where the grasps need
# millimetres; the action noise (and the narrowed draws) still vary the demos.
PARAM_SPREAD = 0.25


def middle(rng: np.random.Generator, lo: float, hi: float, size=None, spread: float = PARAM_SPREAD):
    """Uniform draw from the middle `spread` fraction of [lo, hi]."""
    mid, half = (lo + hi) / 2, spread * (hi - lo) / 2
    return rng.uniform(mid - half, mid + half, size)


def lean(R: np.ndarray, toward_xy, angle: float) -> np.ndarray:
    """R (pointing down) turned so the fingertips (site z) lean `angle` from vertical towards the horizontal
    direction toward_xy. Turning about the horizontal axis normal to toward_xy keeps fingers that close
    across that direction closing across it (a handle along toward_xy stays between them)."""
    d = np.append(np.asarray(toward_xy) / np.linalg.norm(toward_xy), 0.0)
    return Rotation.from_rotvec(angle * np.cross([0.0, 0.0, -1.0], d)).as_matrix() @ R


def hammer_pose(transport):
    """(handle centre, unit handle axis pointing at the head, half size of the head) of the payload."""
    R = transport.sim.data.body_xmat[transport.payload_body_id].reshape(3, 3)
    return transport.payload_pos, R[:, 2].copy(), transport.payload.head_halfsize


class TransportArm(ArmExpert):
    """One arm of the transport expert, stateless (like SquareExpert): each call reads which object this arm is
    working on and how far it got from the simulator state -- where the lid, the trash cube and the hammer are,
    which hand holds what (finger gap closed on that object's width, the grasp point between the fingers), the
    arms' velocities -- so the clean action is a function of the state and the episode's parameters only, and the
    expert can label any state a learner reaches (DAgger). The two arms are coupled through the state alone: robot1
    comes for the hammer when robot0 holds it still at the hand-over point, robot0 lets go once robot1's fingers
    are closed on the handle, robot1 carries it away once robot0's open hand has risen clear.
    `handover`: where robot0 presents the hammer in the air (its grasp point, handle along y); `grips` = (u,
    spacing): the arm on the head's side grasps the handle u m from its centre towards the head, the other arm
    `spacing` further from the head (hammer_grip_point)."""

    stateless = True
    # finger gap closed on each object (open 0.079): lid handle 0.020, hammer handle 0.029, trash cube 0.039
    HELD_GAP = {"lid": (0.014, 0.025), "hammer": (0.022, 0.033), "cube": (0.032, 0.044)}
    FIRM_GAP = 0.0305  # robot1's fingers have finished closing on the handle (robot0 may let go)
    STILL = 0.04  # m/s: an arm this slow is holding still
    # xy gain while descending, closing and lowering a load: low over the bins near its base the arm drifts sideways
    # at up to 3 mm per step under the operational-space controller, which the unit gain leaves at 1.5-3 cm (the
    # cube is 4 cm wide); three times the gain holds it within 7 mm
    KP_XY_GRASP = 3.0

    def __init__(self, sim_env, rng, noise, robot: int, handover: np.ndarray, grips: tuple[float, float]):
        self.neutral_yaw, self.side = NEUTRAL_YAW[robot], SIDE[robot]
        self.handover, self.grips = handover, grips
        self.transport = sim_env.transport
        self.partner: TransportArm | None = None
        super().__init__(sim_env, rng, noise, robot)
        self.kp, self.vmax = middle(rng, 0.8, 1.2), middle(rng, 0.6, 1.0)  # ArmExpert's gain and speed cap, narrowed
        self.site_name = self.sim.model.site_id2name(self.site)

    # -- state readers
    def wrist(self, yaw: float, period: float) -> np.ndarray:
        """Top-down orientation at `yaw` modulo the object's symmetry `period`, taking the yaw closest to
        this arm's home wrist yaw (keeps joint 7 far from its limits)."""
        return down_at_yaw(self.neutral_yaw + wrap(yaw - self.neutral_yaw, period))

    def eef_speed(self) -> float:
        return float(np.linalg.norm(self.sim.data.get_site_xvelp(self.site_name)))

    def gap_speed(self) -> float:
        """Rate of change of the finger gap (m/s; > 0 while the fingers open)."""
        v = self.sim.data.qvel[self.robot._ref_gripper_joint_vel_indexes["right"]]
        return float(v[0] - v[1])

    # -- joint limits: the operational-space controller knows none, so a servo whose shortest task-space path needs a
    # joint past its limit pushes it there and stalls for good (a DAgger learner drove robot1's wrist, joint 6, onto
    # its limit in 15% of the states of the last round, where the unclamped expert could not move it again). The
    # clamping rule of inverse kinematics (e.g. Baerlocher & Boulic 2004, "An inverse kinematics architecture
    # enforcing an arbitrary number of strict priority levels"): map the commanded pose change to joint motion, allow
    # a joint LIMIT_RATE x (its distance to a band LIMIT_BAND inside the limit) towards that limit -- inside the band
    # that bound is negative, i.e. the joint is moved back out -- and send the pose change the clamped joint motion
    # makes. Away from the limits the bound is loose and the action is unchanged; it is a function of the state only.
    LIMIT_BAND = 0.15  # rad
    LIMIT_RATE = 0.5  # joint motion allowed towards a limit, per rad of distance to the band (per action step)

    def servo(self, tgt_pos, tgt_R, grip, **kw) -> np.ndarray:
        a = super().servo(tgt_pos, tgt_R, grip, **kw)
        return np.concatenate([self.clamp_joint_limits(a[:6]), a[6:]])

    def clamp_joint_limits(self, twist: np.ndarray) -> np.ndarray:
        """The 6-D pose action `twist` changed so that no joint is driven into (and each is driven out of) the band
        within LIMIT_BAND of its limits; unchanged where no joint bound binds."""
        rob, d = self.robot, self.sim.data
        q = d.qpos[rob._ref_joint_pos_indexes]
        lo, hi = self.sim.model.jnt_range[rob._ref_joint_indexes].T
        J = np.vstack([d.get_site_jacp(self.site_name).reshape(3, -1),
                       d.get_site_jacr(self.site_name).reshape(3, -1)])[:, rob._ref_joint_vel_indexes]
        x = np.concatenate([twist[:3] * POS_SCALE, twist[3:] * ROT_SCALE])  # pose change (m, rad)
        dq = J.T @ np.linalg.solve(J @ J.T + 1e-4 * np.eye(6), x)  # damped least squares
        dq_c = np.clip(dq, -self.LIMIT_RATE * (q - lo - self.LIMIT_BAND), self.LIMIT_RATE * (hi - q - self.LIMIT_BAND))
        if np.array_equal(dq_c, dq):
            return twist
        dx = J @ (dq_c - dq)
        return np.clip(twist + np.concatenate([dx[:3] / POS_SCALE, dx[3:] / ROT_SCALE]), -1.0, 1.0)

    def holds(self, obj: str, point, radius: float = 0.03) -> bool:
        """The fingers have closed on `obj` (gap within its width's band, neither closing nor opening) with `point`
        within 3 cm (the grip site sits up to 2 cm off the object's centre once the fingers close)."""
        lo, hi = self.HELD_GAP[obj]
        return self.pos_err(point) < radius and lo < self.finger_gap() < hi and abs(self.gap_speed()) < 0.05

    def hammer_grip_point(self) -> tuple[np.ndarray, float, np.ndarray]:
        """This arm's grasp point on the hammer handle, the handle's yaw in the world, and the unit handle
        direction from that point towards the other arm's grasp. The arm on the head's side (the head
        may point either way) grasps near the centre of mass (~6 cm towards the head) but >= 3 cm short
        of the head, which a finger would land on; the other arm grasps on its own side of that."""
        centre, axis, _ = hammer_pose(self.transport)
        head_side = 1.0 if axis[1] >= 0 else -1.0  # world y sign of the head
        u, spacing = self.grips
        if self.side != head_side:
            u -= spacing
        return centre + u * axis, float(np.arctan2(axis[1], axis[0])), -self.side * head_side * axis

    def holds_hammer(self, firm: bool = False) -> bool:
        grip = self.hammer_grip_point()[0]
        return self.holds("hammer", grip, 0.04) and (not firm or self.finger_gap() < self.FIRM_GAP)

    # -- shared motions
    def approach(self, grasp_pt, R_t, hover_h: float, obj: str, xy_tol: float = 0.008):
        """Free hand to a grasp point along the approach axis a = R_t's z (down for a top grasp): rise clear if
        low and off to the side, hover hover_h back along a, come down the axis once on it, close at the point;
        fingers closed on nothing open again while backing off."""
        pos, R = self.eef()
        a = R_t[:, 2]
        rel = grasp_pt - pos
        along = float(rel @ a)
        lateral = float(np.linalg.norm(rel - along * a))
        gap = self.finger_gap()
        lo = self.HELD_GAP[obj][0]
        dist = float(np.linalg.norm(rel))
        # at the point, or stopped against the object within 2 cm (pads touching it, or the object in the way)
        at_point = (along < 0.008 and lateral < 0.02) or (dist < 0.03 and along < 0.02 and self.eef_speed() < 0.01)
        # once the fingers move in they finish closing (but fingers still opening after a release keep opening)
        closing = self.gap_speed() < -0.005 or (gap < 0.075 and self.gap_speed() < 0.05)
        if gap > lo and ((closing and dist < 0.04) or at_point):
            self.phase = "close"  # at the grasp point, or already closing on the object: close in place
            return self.servo(grasp_pt, R_t, GRIP_CLOSE, kp_xy=self.KP_XY_GRASP)
        if gap < 0.07:
            self.phase = "reopen"  # closed on nothing or lost the object: open while backing off
            return self.servo(pos - 0.03 * a, R, GRIP_OPEN)
        hover = grasp_pt - hover_h * a
        below = along < hover_h - 0.02  # already on the way down: only gross errors send the hand back up
        if (lateral < (0.02 if below else xy_tol) and along > -0.01
                and self.ang_err(R_t) < (0.2 if below else 0.1)):
            self.phase = "descend"
            return self.servo(grasp_pt, R_t, GRIP_OPEN, vmax_z=self.descend_vmax, kp_xy=self.KP_XY_GRASP)
        if np.linalg.norm(hover[:2] - pos[:2]) > 0.03 and pos[2] < hover[2] - 0.03:
            self.phase = "rise"  # low and off to the side (next to a bin wall or an object): straight up first,
            # 3 cm past the hover height so that the diagonal move to the hover point stays above this branch's bound
            return self.servo(np.append(pos[:2], hover[2] + 0.03), R_t, GRIP_OPEN)
        self.phase = "hover"
        return self.servo(hover, R_t, GRIP_OPEN)

    def move_held(self, d, carry_z, lower_z, lowered: bool, R_t, near: float = 0.02, settle: float = np.inf):
        """Object in the hand, its drop point d away (xy): lift straight up to carry_z, carry it over, lower it
        to lower_z while servoing d out (starting only once the hand is slower than `settle` m/s: a swinging load
        hits the walls; once on the way down, or where the arm cannot bring d under `near`, it goes down with d
        under 6 cm: a hanging load swings, and the bins are 30 cm wide), open once `lowered`."""
        pos, _ = self.eef()
        e = float(np.linalg.norm(d))
        lowering = pos[2] < carry_z - 0.02
        stalled = self.eef_speed() < 0.02  # d cannot be servoed out further (the arm's reach, a hanging load)
        if (e < near and (lowering or self.eef_speed() < settle)) or (e < 0.06 and (lowering or stalled)):
            if lowered:
                self.phase = "release"
                return self.servo(pos, R_t, GRIP_OPEN)
            self.phase = "lower"  # the same sideways drift as in a grasp (see KP_XY_GRASP) pulls a lowered load
            return self.servo(np.append(pos[:2] + d, lower_z), R_t, GRIP_CLOSE, vmax=0.6, vmax_z=0.3,
                              kp_xy=self.KP_XY_GRASP)
        if pos[2] < carry_z - 0.03 and e > 0.06:
            self.phase = "lift"
            return self.servo(np.append(pos[:2], carry_z), R_t, GRIP_CLOSE)
        self.phase = "carry"
        return self.servo(np.append(pos[:2] + d, carry_z), R_t, GRIP_CLOSE)

    def idle(self, R_t):
        """Nothing left to do (an object fell where no arm reaches): hold still, open."""
        self.phase = "give_up"
        return self.servo(self.eef()[0], R_t, GRIP_OPEN)


class UnpackArm(TransportArm):
    """robot0: lift the lid off the start bin and put it down beside it, pick the hammer by its handle on
    robot0's side of the centre of mass, turn it so the handle points at robot1, present it at the
    hand-over point, let go once robot1 holds the other side, rise clear and back off."""

    def sample(self):
        r = self.rng
        self.lid_hover_h = middle(r, 0.05, 0.09)
        self.lid_grasp_dz = middle(r, -0.004, 0.002)
        self.lid_lift_z = middle(r, 1.06, 1.12)
        # beside the start bin (x ~ +0.2) on the free half of table 0 (the lid is 0.3 m square)
        self.lid_drop = np.array([-0.2, self.env.table_offsets[0, 1]]) + middle(r, -0.02, 0.02, 2)
        self.lid_release_h = middle(r, 0.04, 0.06)  # handle centre above the table top at release
        self.hammer_hover_h = middle(r, 0.17, 0.21)  # clears the start bin's walls (0.125 m above its floor)
        self.grasp_dz = middle(r, -0.002, 0.003)
        self.carry_z = middle(r, 1.08, 1.14)
        self.descend_vmax = middle(r, 0.4, 0.6)

    def lid_off(self, handle) -> bool:
        """The lid rests on the table beside the start bin (not held: the caller checks that first)."""
        return handle[0] < 0.0 and handle[2] < 0.8 + self.lid_release_h + 0.03  # the start bin is at x ~ +0.2

    def policy(self):
        self.sim.forward()  # see SquareExpert.policy
        tr = self.transport
        pos, R = self.eef()
        # 1. the lid: off the start bin and down beside it
        handle = tr.lid_handle_pos
        R_lid = self.sim.data.geom_xmat[tr.lid_handle_geom_ids[0]].reshape(3, 3)
        R_t = self.wrist(body_yaw(R_lid) - np.pi / 2, np.pi)  # fingers across the handle's thin side
        grasp_pt = handle + [0.0, 0.0, self.lid_grasp_dz]
        if self.holds("lid", grasp_pt):
            d = self.lid_drop - handle[:2]
            return self.move_held(d, self.lid_lift_z, pos[2] + (0.8 + self.lid_release_h - handle[2]),
                                  handle[2] < 0.8 + self.lid_release_h + 0.01, R_t)
        if not self.lid_off(handle):
            return self.approach(grasp_pt, R_t, self.lid_hover_h, "lid")
        # 2. the hammer
        grip, handle_yaw, _ = self.hammer_grip_point()
        if self.partner.holds_hammer(firm=True) or tr.payload_in_target_bin or grip[1] > 0.15:
            return self.hand_over_done(grip)
        R_present = self.wrist(np.pi / 2, np.pi)
        if self.holds_hammer():
            if pos[2] < self.carry_z - 0.03 and np.linalg.norm(pos[:2] - self.handover[:2]) > 0.1:
                self.phase = "lift"  # straight up out of the bin, keeping the grasp orientation
                return self.servo(np.append(pos[:2], self.carry_z), self.wrist(handle_yaw, np.pi), GRIP_CLOSE)
            # bring it to the hand-over point, handle along y, and hold it there (or where the arm stalls, near
            # the edge of its reach) until robot1's fingers are closed on it
            self.phase = "present" if self.pos_err(self.handover) < 0.01 else "bring"
            return self.servo(self.handover, R_present, GRIP_CLOSE)
        if grip[2] < 0.7 or (grip[2] < 0.9 and abs(grip[1] - self.env.table_offsets[0, 1]) > 0.2):
            return self.idle(R)  # the hammer fell off the table or between the tables: nothing left to do
        return self.approach(grip + [0.0, 0.0, self.grasp_dz], self.wrist(handle_yaw, np.pi), self.hammer_hover_h,
                             "hammer", xy_tol=0.006)

    def hand_over_done(self, grip):
        """robot1 holds the hammer (or it is already on its way): open, rise clear straight up (backing off at
        once drags a head held next to the fingers), then back off towards the base, out of robot1's way."""
        pos, _ = self.eef()
        R_present = self.wrist(np.pi / 2, np.pi)
        if self.finger_gap() < 0.06 and self.pos_err(grip) < 0.03:
            self.phase = "release"
            return self.servo(pos, R_present, GRIP_OPEN)
        if pos[2] < self.handover[2] + 0.05 and np.linalg.norm(pos[:2] - grip[:2]) < 0.05:
            self.phase = "clear"
            return self.servo(pos + [0.0, 0.0, 0.04], R_present, GRIP_OPEN)
        self.phase = "retreat"
        return self.servo(self.handover + [0.0, -0.25, 0.07], R_present, GRIP_OPEN)

    def presenting(self) -> bool:
        """Holding the hammer still at (or stalled near) the hand-over point: robot1 may come for it."""
        return (self.holds_hammer() and self.pos_err(self.handover) < 0.05 and self.eef()[0][2] > self.carry_z - 0.06
                and self.eef_speed() < self.STILL)

    def let_go(self) -> bool:
        """Open and risen clear of the handle."""
        grip = self.hammer_grip_point()[0]
        return self.finger_gap() > 0.06 and self.pos_err(grip) > 0.04


class ReceiveArm(TransportArm):
    """robot1: move the trash cube from the target bin into the trash bin (again if it missed), wait above
    the hand-over point, grasp the handle on robot1's side once robot0 presents the hammer, carry it over
    the target bin (servoing the hammer's middle, not the wrist), lower it inside and let go."""

    def sample(self):
        r = self.rng
        self.trash_hover_h = middle(r, 0.17, 0.21)  # clears the target bin's walls
        # fingertips just off the bin floor: dragging on it pushes the hand off the cube while the fingers close
        self.trash_grasp_off = np.append(middle(r, -0.004, 0.004, 2), 0.003 + middle(r, -0.003, 0.003))
        self.trash_carry_z = middle(r, 1.04, 1.10)
        self.trash_drop = np.array(self.transport.trash_bin_pos[:2]) + middle(r, -0.03, 0.03, 2)
        self.trash_release_z = middle(r, 0.95, 1.0)
        self.wait_h = middle(r, 0.10, 0.14)  # above the hand-over grasp point while robot0 brings the hammer
        self.lean = middle(r, 0.4, 0.6)  # rad, fingertips towards robot0 at the hand-over
        self.carry_lean = middle(r, 0.0, 0.15)  # rad, the same while carrying the hammer to the target bin
        self.hover_h = middle(r, 0.06, 0.09)
        self.grasp_dz = middle(r, -0.002, 0.003)
        self.carry_z = middle(r, 1.08, 1.14)
        self.bin_xy = np.array(self.transport.target_bin_pos[:2]) + middle(r, -0.01, 0.01, 2)
        self.place_z = middle(r, 0.86, 0.88)  # hammer centre at release: ~3 cm above the bin floor
        self.descend_vmax = middle(r, 0.4, 0.6)
        self.trash_name = self.sim.model.body_id2name(self.transport.trash_body_id)

    def policy(self):
        self.sim.forward()  # see SquareExpert.policy
        tr = self.transport
        pos, R = self.eef()
        # 1. the trash cube into the trash bin
        if not tr.trash_in_trash_bin:
            cube = tr.trash_pos
            R_t = self.wrist(body_yaw(self.sim.data.body_xmat[tr.trash_body_id].reshape(3, 3)), np.pi / 2)
            grasp_pt = cube + self.trash_grasp_off
            if self.holds("cube", grasp_pt):
                d = self.trash_drop - cube[:2]
                return self.move_held(d, self.trash_carry_z, self.trash_release_z,
                                      pos[2] < self.trash_release_z + 0.01, R_t)
            in_bin_area = np.all(np.abs(cube[:2] - tr.trash_bin_pos[:2]) < 0.15)
            if in_bin_area and np.linalg.norm(self.sim.data.get_body_xvelp(self.trash_name)) > 0.02:
                self.phase = "drop"  # let go over the bin: rise while it falls in
                return self.servo(np.append(pos[:2], self.trash_carry_z), R_t, GRIP_OPEN)
            return self.approach(grasp_pt, R_t, self.trash_hover_h, "cube", xy_tol=0.006)
        # 2. the hammer: take it from robot0, put it in the target bin
        grip, handle_yaw, inwards = self.hammer_grip_point()
        in_bin_area = np.all(np.abs(self.hammer_extent_centre()[:2] - tr.target_bin_pos[:2]) < 0.15)
        if in_bin_area and not self.holds_hammer():
            self.phase = "retreat"  # let go over the bin: rise while it settles
            return self.servo(np.append(pos[:2], self.carry_z), R, GRIP_OPEN)
        # at the hand-over the hammer is at the edge of a vertical wrist's reach: lean the fingertips towards
        # robot0 and come in along them
        R_t = lean(self.wrist(handle_yaw, np.pi), inwards[:2], self.lean)
        if self.holds_hammer():
            # held: the orientation it was taken in at the hand-over (handle along y, fingertips towards robot0),
            # not one re-aimed at the hammer's pose: a load that pivots in the hand would be chased round
            R_t = lean(self.wrist(np.pi / 2, np.pi), [0.0, -1.0], self.lean)
            if not self.partner.let_go():
                self.phase = "hold"  # closed on it: hold still until robot0 has opened and risen clear
                return self.servo(grip + [0.0, 0.0, self.grasp_dz], R_t, GRIP_CLOSE)
            # carried with the wrist nearly upright: leaning towards robot0 over the target bin, next to robot1's
            # base, puts joint 6 at its limit before the hammer is down, and levels the tilted hammer
            R_t = lean(self.wrist(np.pi / 2, np.pi), [0.0, -1.0], self.carry_lean)
            centre = self.hammer_extent_centre()
            d = self.bin_xy - centre[:2]
            lowered = centre[2] < self.place_z + 0.01 or (centre[2] < self.place_z + 0.05 and self.eef_speed() < 0.01)
            return self.move_held(d, self.carry_z, pos[2] + (self.place_z - centre[2]), lowered, R_t, near=0.015,
                                  settle=0.08)
        if grip[2] < 0.7 or grip[1] > 0.1:
            return self.idle(R)  # dropped (between the tables, or beside the target bin): nothing left to retry
        if self.partner.presenting() or (self.partner.holds_hammer() and self.pos_err(grip) < self.hover_h + 0.03):
            return self.approach(grip + [0.0, 0.0, self.grasp_dz], R_t, self.hover_h, "hammer")
        self.phase = "wait"
        R_wait = lean(self.wrist(np.pi / 2, np.pi), [0.0, -1.0], self.lean)
        expected = self.handover + [0.0, self.grips[1], 0.0] - (self.hover_h + self.wait_h) * R_wait[:, 2]
        return self.servo(expected, R_wait, GRIP_OPEN)

    def hammer_extent_centre(self) -> np.ndarray:
        """Middle of the hammer from handle end to head end (the head sits past the +axis end)."""
        centre, axis, head = hammer_pose(self.transport)
        return centre + head * axis


class TransportExpert:
    """Both arms of TwoArmTransport: robot0 UnpackArm, robot1 ReceiveArm, one 14-D action per step."""

    stateless = True

    def __init__(self, sim_env, rng: np.random.Generator, noise: float):
        # robot0's grasp at the hand-over: just short of the middle between the tables (robot0's vertical
        # wrist reaches y ~ -0.04 at this height; robot1 leans in to reach the other side of the hammer)
        handover = np.array([middle(rng, -0.03, 0.03), middle(rng, -0.07, -0.05), middle(rng, 1.08, 1.14)])
        # hammer grasps (see TransportArm.hammer_grip_point): 7-8 cm apart leaves room for both hands
        grips = (middle(rng, 0.06, 0.07), middle(rng, 0.07, 0.08))
        self.arms = tuple(cls(sim_env, rng, noise, robot, handover, grips)
                          for robot, cls in enumerate((UnpackArm, ReceiveArm)))
        self.arms[0].partner, self.arms[1].partner = self.arms[1], self.arms[0]

    @property
    def phase(self) -> str:
        """"give_up" once either arm gave up (run_arm_episode stops there), else each arm's branch."""
        if any(arm.phase == "give_up" for arm in self.arms):
            return "give_up"
        return " | ".join(arm.phase for arm in self.arms)

    def policy(self) -> np.ndarray:
        return np.concatenate([arm.policy() for arm in self.arms])

    @property
    def clean(self) -> np.ndarray:
        return np.concatenate([arm.clean for arm in self.arms])

    def __call__(self) -> np.ndarray:
        return np.concatenate([arm() for arm in self.arms])


EXPERTS = {"lift": LiftExpert, "can": CanExpert, "square": SquareExpert, "transport": TransportExpert}


# ----------------------------------------------------------------------------- FrankaKitchen
DT = tasks.KITCHEN_DT
ARM = slice(0, 7)
# Site frame of `end_effector`: z = approach direction, y = finger opening direction.
R_FWD = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])  # approach +y, fingers open along x
R_KFWD = np.array([[-1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])  # approach +y, fingers open along z
GOALS = {  # FrankaKitchen-v1 OBS_ELEMENT_INDICES / OBS_ELEMENT_GOALS (kitchen_env.py); done when L2 < 0.3
    "bottom burner": ([11, 12], [-0.88, -0.01]),
    "light switch": ([17, 18], [-0.69, -0.05]),
    "slide cabinet": ([19], [0.37]),
    "microwave": ([22], [-0.75]),
    "kettle": ([23, 24, 25, 26, 27, 28, 29], [-0.23, 0.75, 1.62, 0.99, 0.0, 0.0, -0.06]),
}
DONE_DIST = 0.3


def subtask_done(qpos: np.ndarray, name: str) -> bool:
    idx, goal = GOALS[name]
    return bool(np.linalg.norm(qpos[idx] - np.asarray(goal)) < DONE_DIST)


def rot_about(axis, angle: float) -> np.ndarray:
    return Rotation.from_rotvec(angle * np.asarray(axis, dtype=np.float64)).as_matrix()


# ---------------------------------------------------------------------------------------------- geometry
# FrankaKitchen-v1 model, read with mujoco: the microwave handle is a vertical bar on a door hinged about z at
# microdoorroot (the door opens towards the robot as q22 -> -0.75); the kettle handle a horizontal bar (along x)
# at kettle_site; the light switch a lever hinged about z whose tip (light_site) moves -x as q17 -> -0.69; the slide
# cabinet handle a vertical bar that slides +x (q19 -> 0.37); the bottom-burner knob a fin (2.8 cm wide in x, 9.6 cm
# tall) at knob2_site that turns about the wall normal: q11 -> -0.88 is a rotation of +0.88 rad about world +y.
PITCH = -0.7  # the bottom-burner approach is pitched 0.7 rad downwards
# Arm configuration 14 cm in front of the knob's fin, found by the IK from the start pose (a joint-space target that
# resets the posture before the burner; see KitchenExpert.bottom_burner).
BURNER_HOME = np.array([-0.61, -0.53, 0.98, -2.21, 0.15, 1.14, 0.38])


def kettle_yaw(d) -> float:
    w, x, y, z = d.qpos[26:30]
    return float(np.arctan2(2 * (w * z + x * y), 1 - 2 * (y * y + z * z)))


class KitchenExpert:
    """Stateless FrankaKitchen expert: each action is a function of the current MuJoCo state (qpos, qvel) and the
    episode's parameters (subtask order, offsets, speed caps), as for SquareExpert and TransportExpert, so that it
    can label any state a learner reaches (DAgger). The subtask in hand is the first one of the order that the state
    shows unfinished (finished() below); its branch -- approach, insert, close, pull/carry/push, release, back off
    -- is read from where the hand is relative to the handle, the finger gap and its rate, and the object's joint.
    `expert()` returns the noisy action (9-D, in [-1, 1]) and sets .clean (the label) and .phase."""

    stateless = True
    OPEN = 0.072  # finger gap (qpos 7 + 8; 0.08 fully open) above which the hand counts as open
    # the gap closed on each handle (microwave bar ~0.041, kettle handle ~0.064; on nothing ~0), and whether the
    # fingers must also have stopped closing: the kettle's band starts just below an open hand's gap, the microwave's
    # is narrow, and pulling the door jerks the fingers
    HELD_GAP = {"microwave": (0.02, 0.05, False), "kettle": (0.05, OPEN, True), "bottom burner": (0.01, 0.06, True)}

    def __init__(self, sim_env, order, rng: np.random.Generator, noise: float):
        import mujoco

        self.mj = mujoco
        self.env = sim_env.unwrapped
        self.m, self.d = self.env.model, self.env.data
        self.rng, self.noise, self.order = rng, noise, list(order)
        self.site = self.m.site("end_effector").id
        self.kp = self.m.actuator_gainprm[:9, 0].copy()
        # Steady state of a position servo with joint damping b: kp*(target - q) = b*qdot, so a joint
        # velocity qdot needs a target lead of (b/kp)*qdot; the action sets a lead of 2*a*dt.
        self.vel_gain = self.m.dof_damping[:9] / self.kp / (2 * DT)
        # The env clips servo targets to franka_config.xml's bounds, which are tighter than the model's joint
        # ranges for joint 6 ([0, 3.8] vs [-1.66, 2.11]) and joint 4 (upper 0 vs -0.4): use the intersection.
        bounds = self.env.robot_env.robot_pos_bound[:7]
        self.lo = np.maximum(self.m.jnt_range[:7, 0], bounds[:, 0])
        self.hi = np.minimum(self.m.jnt_range[:7, 1], bounds[:, 1])
        self.q_nom = np.array(self.env.robot_env.init_qpos[ARM])  # the start pose (the IK's null-space target)
        self.q_nom[1] = -1.5  # inside joint 2's range
        self.q_nom[5] = 1.6  # keeps joint 6 off its lower bound (0) when reaching low and forward
        self.jac = (np.zeros((3, self.m.nv)), np.zeros((3, self.m.nv)))
        def u(lo, hi, size=None):  # see PARAM_SPREAD
            return middle(rng, lo, hi, size)
        self.vmax = u(0.7, 1.0)  # m/s, per-episode speed cap
        # per-subtask parameters: offsets of the pre-grasp point (jit) and of the grasp, speeds, how far to push
        self.p = {
            "microwave": dict(jit=u(-0.008, 0.008, 3), pitch=u(0.35, 0.5), dz=u(-0.04, 0.04), lead=u(0.25, 0.35),
                              vmax=u(0.3, 0.45)),
            "kettle": dict(jit=u(-0.008, 0.008, 3), dx=u(-0.008, 0.008), lift=u(0.08, 0.12),
                           goal=u(-0.02, 0.02, 2), vmax=u(0.45, 0.6)),
            "light switch": dict(jit=u(-0.008, 0.008, 3), dz=u(-0.01, 0.01)),
            "slide cabinet": dict(jit=u(-0.008, 0.008, 3), dz=u(-0.03, 0.03)),
            "bottom burner": dict(jit=u(-0.008, 0.008, 3), dz=u(-0.01, 0.01), home=u(-0.05, 0.05, 7),
                                  turn=u(0.9, 1.0)),
        }
        self.phase, self.clean = "start", np.zeros(9)

    # ------------------------------------------------------------------ state
    def ee(self):
        return self.d.site_xpos[self.site].copy(), self.d.site_xmat[self.site].reshape(3, 3).copy()

    def site_pos(self, name: str) -> np.ndarray:
        return self.d.site(name).xpos.copy()

    def gap(self) -> float:
        return float(self.d.qpos[7] + self.d.qpos[8])

    def gap_speed(self) -> float:
        """Rate of change of the finger gap (m/s, < 0 while closing)."""
        return float(self.d.qvel[7] + self.d.qvel[8])

    def holds(self, name: str, point, radius: float = 0.03) -> bool:
        """Fingers closed on `name`'s handle (gap in its band, settled where that matters) with the hand within
        `radius` of `point`."""
        lo, hi, settled = self.HELD_GAP[name]
        return (lo < self.gap() < hi and (not settled or abs(self.gap_speed()) < 0.03)
                and np.linalg.norm(self.ee()[0] - point) < radius)

    def finished(self, name: str) -> bool:
        """The subtask is done with a margin past D4RL's 0.3 threshold (subtask_done), read from the state."""
        q = self.d.qpos
        if name == "microwave":
            return q[22] < -0.47  # done below -0.45; the door stalls near -0.5 (joint 6 at its bound)
        if name == "kettle":  # down on (or, pitched in the hand, touching) the goal burner: time to let go
            # (carried by its top handle in a friction grip, the kettle pitches back by up to ~30 degrees, its body
            # up to 12 cm behind the handle; let go, it comes to rest upright)
            goal = GOALS["kettle"][1]
            body = self.d.body("kettle").xpos
            return bool(np.linalg.norm(body[:2] - goal[:2]) < 0.12 and body[2] < goal[2] + 0.045)
        if name == "light switch":
            return q[17] < -0.6  # done below -0.39
        if name == "slide cabinet":
            return q[19] > 0.38  # done above 0.07
        return q[11] < -0.75  # bottom burner: done below -0.58

    # ------------------------------------------------------------------ control
    def ik(self, p_tgt, R_tgt, grip, vmax=None, wmax=2.0) -> np.ndarray:
        """One IK step towards the pose (p_tgt, R_tgt); grip +1 opens, -1 closes the fingers."""
        p, R = self.ee()
        v = (np.asarray(p_tgt) - p) / DT
        n = np.linalg.norm(v)
        vmax = self.vmax if vmax is None else vmax
        if n > vmax:
            v *= vmax / n
        w = rot_err(R_tgt, R) / DT
        n = np.linalg.norm(w)
        if n > wmax:
            w *= wmax / n
        jp, jr = self.jac
        self.mj.mj_jacSite(self.m, self.d, jp, jr, self.site)
        J = np.vstack([jp[:, ARM], jr[:, ARM]])
        x = np.r_[v, w]
        q = self.d.qpos[ARM]
        free = np.ones(7, dtype=bool)
        dq = np.zeros(7)
        # Clamp and re-solve: joints within 0.08 rad of a limit that the solution pushes further out are
        # frozen and the IK is solved again with the rest (up to 4 passes).
        for _ in range(4):
            Jf = J[:, free]
            JJ = Jf @ Jf.T + 0.05**2 * np.eye(6)
            pinv = Jf.T @ np.linalg.solve(JJ, np.eye(6))
            dqf = pinv @ x
            null = (np.eye(int(free.sum())) - pinv @ Jf) @ (0.3 * (self.q_nom - q)[free])
            dq = np.zeros(7)
            dq[free] = dqf + null
            bad = free & (((q - self.lo < 0.08) & (dq < 0)) | ((self.hi - q < 0.08) & (dq > 0)))
            if not bad.any():
                break
            free &= ~bad
        dq[(q - self.lo < 0.0) & (dq < 0)] = 0.0  # never push further past a limit
        return self._servo(dq, grip)

    def joint_move(self, q_tgt, grip, speed=2.0) -> np.ndarray:
        """One joint-space step towards the arm configuration q_tgt (rad/s capped at `speed`)."""
        return self._servo(np.clip((np.asarray(q_tgt) - self.d.qpos[ARM]) / DT, -speed, speed), grip)

    def _servo(self, dq, grip) -> np.ndarray:
        """The action for joint velocities dq: scaled by damping/kp plus a gravity (and Coriolis) feed-forward (the
        servo force kp*(lead) must hold qfrc_bias). A motion that needs more than the action range is slowed as a
        whole, so that the hand keeps its direction (the env clips each joint alone, which bends the path)."""
        bias = self.d.qfrc_bias[:9] / self.kp / (2 * DT)
        v = np.asarray(dq) * self.vel_gain[ARM]
        with np.errstate(divide="ignore", invalid="ignore"):
            room = np.where(v > 0, (1.0 - bias[ARM]) / v, np.where(v < 0, (-1.0 - bias[ARM]) / v, np.inf))
        a = bias.copy()
        a[ARM] += float(np.clip(room.min(), 0.0, 1.0)) * v
        a[7:9] = grip
        return a

    def reach(self, pre, grasp, R_t, grip, name: str, tol: float = 0.02, vmax: float = 0.5,
              rtol: float = 0.15) -> np.ndarray:
        """Free hand to `grasp` via the pre-grasp point `pre`: inside a cylinder of radius `tol` around the segment
        pre -> grasp (twice that past its first 3 cm) with the orientation R_t (within 0.15 rad; `rtol` past the first
        3 cm), come in along it; elsewhere go to `pre` first."""
        p, R = self.ee()
        length = float(np.linalg.norm(grasp - pre))
        axis = (grasp - pre) / length
        rel = grasp - p
        along = float(rel @ axis)
        lateral = float(np.linalg.norm(rel - along * axis))
        # entering at the pre-grasp end takes the tolerances; once on the way in, only gross errors send it back
        entering = along > length - 0.03
        if (lateral < (tol if entering else 2 * tol) and -0.01 < along < length + 0.02
                and np.linalg.norm(rot_err(R_t, R)) < (0.15 if entering else rtol)):
            self.phase = f"{name}:insert"
            return self.ik(grasp, R_t, grip, vmax=vmax)
        self.phase = f"{name}:pre"
        return self.ik(pre, R_t, grip)

    def grasp_branch(self, name, pre, grasp, R_t, held) -> np.ndarray | None:
        """Open hand to the grasp point via `pre`, close there; None once `held` (the caller moves the object).
        Fingers closed on nothing open again while backing off towards `pre`."""
        p, _ = self.ee()
        gap, lo = self.gap(), self.HELD_GAP[name][0]
        if held:
            return None
        at_point = np.linalg.norm(p - grasp) < 0.012
        closing = self.gap_speed() < -0.01 and np.linalg.norm(p - grasp) < 0.03
        if gap > lo and (at_point or closing):
            self.phase = f"{name}:close"
            return self.ik(grasp, R_t, -1.0, vmax=0.3)
        if gap < self.OPEN:
            self.phase = f"{name}:reopen"  # closed on nothing, or the handle slipped out: open, back off
            return self.ik(p + 0.04 * (pre - grasp) / np.linalg.norm(pre - grasp), R_t, 1.0, vmax=0.3)
        return self.reach(pre, grasp, R_t, 1.0, name)

    # ------------------------------------------------------------------ the subtasks
    def microwave(self) -> np.ndarray:
        """Grasp the handle from the front, pitched down, then lead it around the hinge until the door is open."""
        d, par = self.d, self.p["microwave"]
        hinge = d.body("microdoorroot").xpos
        h = self.site_pos("microhandle_site")
        Rh = d.site("microhandle_site").xmat.reshape(3, 3)  # x along the door, y into the microwave
        # a level approach at the handle's height drives joint 6 into its lower bound (0) as the door swings open
        R_grip = rot_about(Rh[:, 0], -par["pitch"]) @ Rh @ R_FWD
        depth = Rh[:, 1]
        grasp = h + 0.015 * depth + [0.0, 0.0, par["dz"]]
        held = self.holds("microwave", grasp, 0.05)  # the hand trails the handle by up to ~4 cm while pulling
        a = self.grasp_branch("microwave", grasp - 0.135 * depth + par["jit"], grasp, R_grip, held)
        if a is not None:
            return a
        self.phase = "microwave:pull"  # the grasp point rotated about the hinge by -lead (opening is -angle)
        tgt = hinge + rot_z(-par["lead"]) @ (grasp - hinge)
        tgt[2] = grasp[2]
        return self.ik(tgt, rot_z(-par["lead"]) @ R_grip, -1.0, vmax=par["vmax"])

    def kettle_grip_R(self) -> np.ndarray:
        """The gripper turned by the kettle's yaw error (bounded), relative to the gripper's own yaw: the kettle
        hangs from a friction grip and yaws during the carry, and its goal includes the orientation."""
        goal = GOALS["kettle"][1]
        goal_yaw = float(2 * np.arctan2(goal[6], goal[3]))
        _, R = self.ee()
        yaw_now = float(np.arctan2(-R[0, 2], R[1, 2]))
        return rot_z(float(np.clip(yaw_now + 0.7 * (goal_yaw - kettle_yaw(self.d)), -0.5, 0.5))) @ R_KFWD

    def kettle(self) -> np.ndarray:
        """Front grasp of the handle bar (fingers above and below it), lift, carry to the goal burner, lower."""
        d, par = self.d, self.p["kettle"]
        goal = np.asarray(GOALS["kettle"][1])
        site = self.site_pos("kettle_site")
        body = d.body("kettle").xpos
        grasp = site + [par["dx"], 0.0, 0.0]
        held = self.holds("kettle", site, 0.03)
        a = self.grasp_branch("kettle", site + [0.0, -0.14, 0.03] + par["jit"], grasp, R_KFWD, held)
        if a is not None:
            return a
        p, _ = self.ee()
        # the handle at the goal pose (the goal is the body's): its offset in the kettle's frame is fixed
        R_body = d.body("kettle").xmat.reshape(3, 3)
        R_goal = Rotation.from_quat(goal[3:], scalar_first=True).as_matrix()
        goal_site = np.r_[goal[:2] + par["goal"], goal[2]] + R_goal @ R_body.T @ (site - body)
        carry = goal_site + [0.0, 0.0, par["lift"]]
        off = float(np.linalg.norm(goal_site[:2] - site[:2]))
        if off < 0.02 or (off < 0.05 and site[2] < carry[2] - 0.02):  # over the goal, or already on the way down
            self.phase = "kettle:lower"  # until it is down (finished: leave() opens the hand)
            return self.ik(goal_site + [0.0, 0.0, -0.01], self.kettle_grip_R(), -1.0, vmax=0.4)
        if body[2] < goal[2] + 0.04 and off > 0.05:
            self.phase = "kettle:lift"  # straight up off the burner it stands on
            return self.ik(np.r_[p[:2], carry[2]], R_KFWD, -1.0, vmax=0.5)
        self.phase = "kettle:carry"  # the hand (on the handle) to above the goal, the kettle hanging from it
        return self.ik(carry, self.kettle_grip_R(), -1.0, vmax=par["vmax"])

    def push(self, name, site: str, side: float, sign: float) -> np.ndarray:
        """Closed gripper: come in beside the handle (side * 6 cm along x), then push it along sign * x."""
        par = self.p[name]
        h = self.site_pos(site)
        p, _ = self.ee()
        start = h + [side * 0.06, 0.0, par["dz"]]
        if abs(p[1] - h[1]) < 0.03 and abs(p[2] - start[2]) < 0.03 and -0.04 < side * (p[0] - h[0]) < 0.09:
            self.phase = f"{name}:push"  # tracking the handle 6 cm ahead
            return self.ik(np.r_[h[0] + sign * 0.06, start[1:]], R_FWD, -1.0, vmax=0.5 if sign < 0 else 0.6)
        # a closed hand pushes: its orientation matters less than a grasp's
        return self.reach(start + [0.0, -0.10, 0.0] + par["jit"], start, R_FWD, -1.0, name, vmax=self.vmax, rtol=0.4)

    def light_switch(self) -> np.ndarray:
        """Closed gripper: come in to the right of the lever tip, then push it towards -x."""
        return self.push("light switch", "light_site", +1.0, -1.0)

    def slide_cabinet(self) -> np.ndarray:
        """Closed gripper: come in to the left of the handle bar, then push it towards +x."""
        return self.push("slide cabinet", "slide_site", -1.0, +1.0)

    def bottom_burner(self) -> np.ndarray:
        """Pinch the knob's fin from the front (fingers open along x), then roll the wrist about +y."""
        par = self.p["bottom burner"]
        fin = self.site_pos("knob2_site")
        # pitched down: level, joint 6 hits its upper bound before the fingers reach the fin
        R_grip = rot_about([1, 0, 0], PITCH) @ R_FWD
        back = -R_grip[:, 2]
        grasp = fin + 0.04 * back + [0.0, 0.0, par["dz"]]
        pre = grasp + 0.10 * back + par["jit"]
        if self.holds("bottom burner", grasp, 0.03):
            self.phase = "bottom burner:turn"
            return self.ik(grasp, rot_about([0, 1, 0], par["turn"]) @ R_grip, -1.0, wmax=1.5)
        p, _ = self.ee()
        home = BURNER_HOME + par["home"]
        # Cartesian IK from wherever the last subtask left the arm (e.g. after the kettle: wrist wound up, joint 5
        # near its limit) often cannot reach the fin and turn it: a joint-space move to the arm configuration of
        # the pre-grasp pose resets the posture first
        along = float(np.clip((p - pre) @ (grasp - pre) / np.sum((grasp - pre) ** 2), 0.0, 1.0))
        off_path = np.linalg.norm(p - (pre + along * (grasp - pre))) > 0.06  # away from the pre-grasp -> grasp segment
        if off_path and np.abs(self.d.qpos[ARM] - home).max() > 0.12:
            self.phase = "bottom burner:posture"
            return self.joint_move(home, 1.0)
        return self.grasp_branch("bottom burner", pre, grasp, R_grip, False)

    def leave(self, name) -> np.ndarray | None:
        """After a finished subtask, while the hand is still at its handle: open in place, then back off (so the
        next approach does not drag the object along). None once clear."""
        p, R = self.ee()
        if name == "microwave":
            Rh = self.d.site("microhandle_site").xmat.reshape(3, 3)
            h, out = self.site_pos("microhandle_site"), -Rh[:, 1]
        elif name == "kettle":  # straight out along the kettle's own -y (a yawed kettle's post is in the way)
            h = self.site_pos("kettle_site")
            out = -self.d.body("kettle").xmat.reshape(3, 3)[:, 1]
            out[2] = 0.0
            out /= np.linalg.norm(out)
        elif name == "bottom burner":  # along the turned gripper's own axis: open fingers would drag the fin back
            h = self.site_pos("knob2_site")
            out = -R[:, 2]
        else:  # the pushed handles: straight back towards the robot
            h, out = self.site_pos({"light switch": "light_site", "slide cabinet": "slide_site"}[name]), np.array(
                [0.0, -1.0, 0.0])
        if np.linalg.norm(p - h) > 0.11 or (p - h) @ out > 0.09:
            return None
        if name in self.HELD_GAP and (self.gap() < self.OPEN or self.gap_speed() > 0.01):
            # let go fully before backing off: the fingers open slowly (time constant ~0.2 s)
            self.phase = f"{name}:release"
            return self.ik(p, R, 1.0, vmax=0.1)
        self.phase = f"{name}:back"
        return self.ik(h + 0.14 * out, R, 1.0 if name in self.HELD_GAP else -1.0, vmax=0.35)

    def policy(self) -> np.ndarray:
        """The clean action at the current state; sets .phase ("<subtask>:<branch>", or "done")."""
        self.mj.mj_forward(self.m, self.d)  # site poses of the current state (mj_step leaves them one step old)
        todo = [name for name in self.order if not self.finished(name)]
        done = [name for name in self.order if name not in todo]
        for name in done[::-1]:
            a = self.leave(name)
            if a is not None:
                return a
        if not todo:
            self.phase = "done"  # idle in place until the episode ends
            p, R = self.ee()
            return self.ik(p, R, 1.0)
        return getattr(self, todo[0].replace(" ", "_"))()

    def __call__(self) -> np.ndarray:
        self.clean = np.clip(self.policy(), -1.0, 1.0)  # the noiseless action: DAgger's label
        a = self.clean
        if self.noise > 0:
            a = a + self.rng.normal(0.0, self.noise, 9) * np.r_[np.ones(7), 0, 0]
        return np.clip(a, -1.0, 1.0)


def sample_order(subtasks, rng: np.random.Generator, shuffle: bool = True) -> list:
    """A subtask order the expert can do in 280 steps: the two low tasks (microwave, kettle), in random order if
    `shuffle`, then light switch, bottom burner, slide cabinet (those in the set). The low tasks come first
    because the retreats from the high ones pass where the microwave door and kettle are; the light switch
    is not reached in time after the slide cabinet (from up there) or the burner (the turned wrist needs a
    joint-space reset, ~18 steps), so the high ones keep that order. Without `shuffle` it is D4RL
    kitchen-complete's one order (microwave, kettle, light switch, slide cabinet; Fu et al. 2020, arXiv 2004.07219):
    every episode starts from the same state, so a random first subtask is a choice the state cannot tell."""
    low = [s for s in ("microwave", "kettle") if s in subtasks]
    high = [s for s in ("light switch", "bottom burner", "slide cabinet") if s in subtasks]
    return [low[i] for i in (rng.permutation(len(low)) if shuffle else range(len(low)))] + high

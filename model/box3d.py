"""Sparse4D's box layouts: the one place that names their columns.

Encoded (what anchors and predictions hold), 11 values:
    x, y, z, log l, log w, log h, sin yaw, cos yaw, vx, vy, vz
Decoded (what the post-processor returns and the targets hold), 10 values:
    x, y, z, l, w, h, yaw, vx, vy, vz
Both in the LiDAR frame of the current key frame; l (the devkit's length) is the extent along the
box's heading, w across it. The reference names the size columns W, L, H although they hold the
devkit's l, w, h (its converter writes `wlh[[1, 0, 2]]`). Quality estimates are (centerness, yawness).
"""

X, Y, Z, LENGTH, WIDTH, HEIGHT, SIN_YAW, COS_YAW, VX, VY, VZ = range(11)
YAW = 6  # in the decoded layout
CNS, YNS = 0, 1

"""Sparse4D's box layouts: the one place that names their columns.

Encoded (what anchors and predictions hold), 11 values:
    x, y, z, log w, log l, log h, sin yaw, cos yaw, vx, vy, vz
Decoded (what the decoder returns and the targets hold), 10 values:
    x, y, z, w, l, h, yaw, vx, vy, vz
Both in the LiDAR frame of the current key frame. Quality estimates are (centerness, yawness).
"""

X, Y, Z, W, L, H, SIN_YAW, COS_YAW, VX, VY, VZ = range(11)
YAW = 6  # in the decoded layout
CNS, YNS = 0, 1

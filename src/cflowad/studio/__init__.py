"""The studio: the inspection loop (train, review, threshold, feedback, live) on one
local web page, over files in a workspace folder (:mod:`cflowad.studio.workspace`)."""

"""The lab's own plumbing: settings and paths, user-facing errors, atomic files, run folders, detached jobs, safe unpickling."""

"""Files in and out: MRC read/validate/write, input expansion (files, globs, folders, STAR), previews."""

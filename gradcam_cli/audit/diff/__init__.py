"""`gradcam diff`: two explain output folders compared image by image (predictions, map similarity, peak
shift), with a summary, CI gates and a side-by-side page. Reads files only; see `compare`."""

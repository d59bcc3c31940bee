"""The image's way in and out: decoding a photo's bytes (:mod:`.decode`), and making the answer's
bytes from a map (:mod:`.encode`, :mod:`.box`), on the libraries of :mod:`.codecs`."""

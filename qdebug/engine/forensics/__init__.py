"""Forensics on broken images: who owns every host cluster (`layout`), the guest's data got out of
an image QEMU refuses or misreads (`salvage`), a metadata-only copy for handing over (`bundle`).

Unlike the rest of the engine, nothing here trusts the image: the header is read field by field
(`source.ImageFile` opens what `Image` refuses), every pointer is checked before it is followed,
and the answer says what is known and what is not. Sits above `engine.write` and below
`engine.check` (a repair warns before freeing leaked clusters that look like guest data).

Stable API for other tools (the fleet scan builds its signatures on it):
  `layout.host_layout(image) -> HostLayout`   per-run columns (start, count, kind, owner, snapshot,
                                              guess); `HostLayout.owners(cluster)` says who owns
                                              host cluster N, `kind_of(cluster)` what it is
"""

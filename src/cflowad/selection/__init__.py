"""Model selection: choices made on synthetic defects pasted into held-out good images
(never on the user's defects or test labels): ``train --tune`` (:mod:`.tune`) and the
flows an int8 export keeps (:mod:`.int8`)."""

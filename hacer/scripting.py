"""Where scripts written before the script side had its own folder import it from: the same module.

`from hacer import scripting` in a user's script keeps working, unchanged; the library is
`scripting/` (`import scripting`).
"""

import sys

import scripting

sys.modules[__name__] = scripting

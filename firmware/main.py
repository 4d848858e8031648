# citynode node firmware: MicroPython runs this after boot.py.
import node.app

node.app.main()

# conf/: the settings table and the INI reader (inih).
LIB_SRCS += conf/conf.c

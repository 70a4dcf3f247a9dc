# Installation: the m1c command, libm1c, the plugin header, and the files an out-of-tree plugin build
# finds them with: pkg-config (m1c.pc) and a CMake package (find_package(m1c) -> m1c::plugin).
# Plugins install themselves into lib/m1c/plugins/<kind>/ (m1c_add_plugin).
include(CMakePackageConfigHelpers)

install(TARGETS m1c_cli RUNTIME DESTINATION "${CMAKE_INSTALL_BINDIR}")
install(TARGETS m1c LIBRARY DESTINATION "${CMAKE_INSTALL_LIBDIR}")
install(FILES "${PROJECT_SOURCE_DIR}/include/m1c/plugin.h" DESTINATION "${CMAKE_INSTALL_INCLUDEDIR}/m1c")
# Device helpers for plugins' CUDA kernels (warp and warpgroup MMA, TMA, the persistent GEMM tiles).
install(DIRECTORY "${PROJECT_SOURCE_DIR}/include/m1c/cuda" DESTINATION "${CMAKE_INSTALL_INCLUDEDIR}/m1c"
  FILES_MATCHING PATTERN "*.cuh")

# pkg-config: written at install time so that its paths follow `cmake --install --prefix P` (the
# prefix configured now may not be where the files end up).
set(m1c_pc_in "${PROJECT_SOURCE_DIR}/cmake/m1c.pc.in")
set(m1c_pc_out "${CMAKE_BINARY_DIR}/m1c.pc")
install(CODE "
  set(M1C_PC_PREFIX \"\${CMAKE_INSTALL_PREFIX}\")
  set(CMAKE_INSTALL_INCLUDEDIR \"${CMAKE_INSTALL_INCLUDEDIR}\")
  set(CMAKE_INSTALL_LIBDIR \"${CMAKE_INSTALL_LIBDIR}\")
  set(M1C_PLUGIN_INSTALL_DIR \"${M1C_PLUGIN_INSTALL_DIR}\")
  set(PROJECT_VERSION \"${PROJECT_VERSION}\")
  configure_file(\"${m1c_pc_in}\" \"${m1c_pc_out}\" @ONLY)
")
install(FILES "${m1c_pc_out}" DESTINATION "${CMAKE_INSTALL_LIBDIR}/pkgconfig")

# CMake package: relocatable (paths are computed from where m1cConfig.cmake lies).
set(m1c_cmake_dir "${CMAKE_INSTALL_LIBDIR}/cmake/m1c")
configure_package_config_file("${PROJECT_SOURCE_DIR}/cmake/m1cConfig.cmake.in"
  "${CMAKE_BINARY_DIR}/m1cConfig.cmake"
  INSTALL_DESTINATION "${m1c_cmake_dir}"
  PATH_VARS CMAKE_INSTALL_INCLUDEDIR M1C_PLUGIN_INSTALL_DIR)
# Plugins are compatible within one ABI major, which tracks the project's major version.
write_basic_package_version_file("${CMAKE_BINARY_DIR}/m1cConfigVersion.cmake"
  VERSION "${PROJECT_VERSION}" COMPATIBILITY SameMajorVersion ARCH_INDEPENDENT)
install(FILES "${CMAKE_BINARY_DIR}/m1cConfig.cmake" "${CMAKE_BINARY_DIR}/m1cConfigVersion.cmake"
  DESTINATION "${m1c_cmake_dir}")

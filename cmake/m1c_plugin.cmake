# m1c_add_plugin(NAME KIND_DIR SOURCES src... [CUDA_SOURCES cu...] [LIBS lib...])
# Builds plugins/<KIND_DIR>/<NAME>.so (no "lib" prefix) in the build tree and installs it into the
# plugin folder. Plugins see only the public headers: they link against nothing of the core.
set_property(GLOBAL PROPERTY M1C_PLUGIN_TARGETS "")
function(m1c_add_plugin name kind_dir)
  cmake_parse_arguments(P "" "" "SOURCES;CUDA_SOURCES;LIBS" ${ARGN})
  set(target m1c_plugin_${kind_dir}_${name})
  string(REPLACE "-" "_" target "${target}")
  set(srcs ${P_SOURCES})
  if(M1C_HAVE_CUDA AND P_CUDA_SOURCES)
    list(APPEND srcs ${P_CUDA_SOURCES})
  endif()
  add_library(${target} MODULE ${srcs})
  set_target_properties(${target} PROPERTIES
    PREFIX "" OUTPUT_NAME "${name}"
    LIBRARY_OUTPUT_DIRECTORY "${M1C_PLUGIN_BUILD_DIR}/${kind_dir}"
    C_VISIBILITY_PRESET hidden CUDA_VISIBILITY_PRESET hidden)
  target_include_directories(${target} PRIVATE "${PROJECT_SOURCE_DIR}/include")
  target_link_libraries(${target} PRIVATE ${P_LIBS} m)
  if(M1C_HAVE_CUDA AND P_CUDA_SOURCES)
    target_compile_definitions(${target} PRIVATE M1C_HAVE_CUDA=1)
    target_link_libraries(${target} PRIVATE CUDA::cudart CUDA::cublas)
  endif()
  install(TARGETS ${target} LIBRARY DESTINATION "${M1C_PLUGIN_INSTALL_DIR}/${kind_dir}")
  set_property(GLOBAL APPEND PROPERTY M1C_PLUGIN_TARGETS ${target})
endfunction()
